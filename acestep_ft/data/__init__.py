"""Input pipeline: preprocessed or synthetic samples -> padded batches. Never imports the model or the trainer.

    source = build_dataset(cfg.dataset, cfg.cache, ConditionWidths(encoder=H_enc, text=D_text, vocab=V))
    sampler = LengthBucketSampler(source.lengths, batch_size, seed=..., shuffle=..., bucket_frames=...)
    batches = BatchStream(source, sampler)      # batches.next_batch() -> Batch, resumable
Samples carry the condition set dataset.conditions asks for (encoder_outputs or encoder_inputs, see `batch`).
"""

from acestep_ft.data.batch import Batch, ConditionWidths, Sample
from acestep_ft.data.cache import CachedSource, LruSampleCache
from acestep_ft.data.collate import collate
from acestep_ft.data.dataset import InMemorySource, SampleSource, build_dataset
from acestep_ft.data.errors import DataError
from acestep_ft.data.loader import BatchStream
from acestep_ft.data.pt_format import PtDirectory, read_sample
from acestep_ft.data.sampler import EpochBatchSampler, LengthBucketSampler
from acestep_ft.data.synthetic import make_synthetic_samples

__all__ = [
    "Batch",
    "BatchStream",
    "CachedSource",
    "ConditionWidths",
    "DataError",
    "EpochBatchSampler",
    "LengthBucketSampler",
    "InMemorySource",
    "LruSampleCache",
    "PtDirectory",
    "Sample",
    "SampleSource",
    "build_dataset",
    "collate",
    "make_synthetic_samples",
    "read_sample",
]
