"""Condition sets: encoder_inputs (and both) data through .pt, v3, collate, synthetic data, validation and the CLI."""

import json
from dataclasses import replace

import pytest
import torch

from conftest import changed, sample_dict
from acestep_ft.config import CacheConfig, Conditions, PreprocessedDataset, SyntheticDataset
from acestep_ft.data import (BatchStream, ConditionWidths, DataError, InMemorySource, LengthBucketSampler, PtDirectory,
                             Sample, build_dataset, collate)
from acestep_ft.data.batch import INPUT_KEYS, OUTPUT_KEYS
from acestep_ft.data.cache import sample_nbytes
from acestep_ft.data.collate import BatchBuffers, to_float32
from acestep_ft.data.crop import crop_sample
from acestep_ft.data.fingerprint import ENCODER_INPUTS_IGNORE, compare_fingerprints, make_fingerprint
from acestep_ft.data.prefetch import Prefetcher
from acestep_ft.data.pt_format import read_sample, validate_sample
from acestep_ft.data.synthetic import make_synthetic_samples, synthetic_condition_length
from acestep_ft.data.v3_reader import INDEX_NAME, V3Directory
from acestep_ft.data.v3_writer import write_v3
from acestep_ft.data.validate import main

H, D, V = 16, 12, 50
WIDTHS = ConditionWidths(encoder=H, text=D, vocab=V)
INPUTS, OUTPUTS = Conditions.encoder_inputs, Conditions.encoder_outputs
FP = make_fingerprint(None, None, None, "text", "tok", {})
COMMON = ("target_latents", "attention_mask", "context_latents")


def inputs_dict(t: int, lt: int = 6, ll: int = 10, r: int = 1, tr: int = 1, seed: int = 0, dtype=torch.bfloat16,
                id_dtype=torch.int64, token_ids: bool = False, outputs: bool = False) -> dict:
    """A sample carrying the condition encoder's inputs (and, with `outputs`, its outputs too)."""
    d = sample_dict(t=t, width=H, dtype=dtype, seed=seed)
    if not outputs:
        del d["encoder_hidden_states"], d["encoder_attention_mask"]
    g = torch.Generator().manual_seed(1000 + seed)
    text_mask = torch.ones(lt, dtype=torch.bool)
    text_mask[lt - 1:] = False
    d.update(text_hidden_states=torch.randn(lt, D, generator=g).to(dtype), text_attention_mask=text_mask,
             lyric_token_ids=torch.randint(0, V, (ll,), generator=g).to(id_dtype),
             lyric_attention_mask=torch.ones(ll, dtype=torch.int32),
             refer_audio_latents=torch.randn(r, tr, 64, generator=g).to(dtype))
    if token_ids:
        d["text_token_ids"] = torch.randint(0, V, (lt,), generator=g)
    return d


def assert_set_equal(sample: Sample, d: dict, keys, float_dtype=torch.float32) -> None:
    for k in keys:
        got = getattr(sample, k)
        if k.endswith("_ids"):
            assert got.dtype == torch.int64 and torch.equal(got, d[k].long()), k
        else:
            assert got.dtype == float_dtype and torch.equal(got, d[k].to(float_dtype)), k


def save_pts(root, dicts):
    root.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(dicts):
        torch.save(d, root / f"s{i}.pt")
    return root


# ------------------------------------------------------------------------------------------------ .pt
def test_pt_inputs_round_trip_dtypes_and_condition_lengths(tmp_path):
    written = [inputs_dict(t=20 + i, lt=5 + i, ll=7, r=1 + i, id_dtype=torch.int32, token_ids=i == 0, seed=i)
               for i in range(2)]
    root = save_pts(tmp_path / "pt", written)
    src = PtDirectory(root, WIDTHS, conditions=INPUTS)
    for i, d in enumerate(written):
        s = src[i]
        assert s.encoder_hidden_states is None and s.encoder_attention_mask is None
        assert_set_equal(s, d, COMMON + INPUT_KEYS)
        assert (s.text_token_ids is not None) == (i == 0)
    assert src.lengths == [20, 21]
    assert src.cond_lengths == [7 + 1 + 5, 7 + 2 + 6]  # Ll + R + Lt: the condition encoder's output length
    with pytest.raises(DataError, match=r"s0\.pt: carries no encoder_outputs condition set.*found encoder_inputs.*"
                       r"preprocess\.store=outputs or preprocess\.store=both.*dataset\.conditions=encoder_inputs"):
        PtDirectory(root, H).lengths
    with pytest.raises(ValueError, match="needs ConditionWidths"):
        PtDirectory(root, H, conditions=INPUTS)


def test_pt_both_sets_read_either_set_alone(tmp_path):
    d = inputs_dict(t=12, outputs=True, dtype=torch.float32)
    path = save_pts(tmp_path / "pt", [d]) / "s0.pt"
    outs = read_sample(path, WIDTHS)
    assert_set_equal(outs, d, COMMON + OUTPUT_KEYS)
    assert all(getattr(outs, k) is None for k in INPUT_KEYS) and outs.conditions == [OUTPUTS]
    ins = read_sample(path, WIDTHS, conditions=INPUTS)
    assert_set_equal(ins, d, COMMON + INPUT_KEYS)
    assert ins.encoder_hidden_states is None and ins.conditions == [INPUTS]


def test_outputs_only_data_asked_for_inputs_names_file_what_it_has_and_the_fix(tmp_path):
    root = save_pts(tmp_path / "pt", [sample_dict(t=10, width=H)])
    with pytest.raises(DataError) as err:
        build_dataset(PreprocessedDataset(path=str(root), conditions=INPUTS), CacheConfig(), WIDTHS)[0]
    msg = str(err.value)
    assert "s0.pt" in msg and "carries no encoder_inputs condition set" in msg and "found encoder_outputs" in msg
    assert "preprocess.store=inputs or preprocess.store=both" in msg and "dataset.conditions=encoder_outputs" in msg
    with pytest.raises(ValueError, match="needs ConditionWidths"):
        build_dataset(PreprocessedDataset(path=str(root), conditions=INPUTS), CacheConfig(), H)


def bad_inputs(**change):
    return changed(inputs_dict(t=12, dtype=torch.float32), **change)


NAN_TEXT = inputs_dict(t=12, dtype=torch.float32)["text_hidden_states"].clone()
NAN_TEXT[2, 3] = float("nan")


@pytest.mark.parametrize("data, key, found", [
    (bad_inputs(lyric_token_ids=torch.tensor([3, V, 1] + [2] * 7)), "lyric_token_ids", f"ids from 1 to {V}"),
    (bad_inputs(lyric_token_ids=torch.tensor([-1] + [2] * 9)), "lyric_token_ids", "ids from -1 to 2"),
    (bad_inputs(text_token_ids=torch.full((6,), V + 5)), "text_token_ids", f"ids from {V + 5}"),
    (bad_inputs(lyric_token_ids=torch.zeros(10)), "lyric_token_ids", "torch.float32"),
    (bad_inputs(lyric_token_ids=torch.zeros(10, dtype=torch.bool)), "lyric_token_ids", "torch.bool"),
    (bad_inputs(refer_audio_latents=torch.zeros(1, 1, 64, dtype=torch.int64)), "refer_audio_latents", "torch.int64"),
    (bad_inputs(text_hidden_states=torch.zeros(6, D + 1)), "text_hidden_states", f"D_text = {D + 1}"),
    (bad_inputs(text_attention_mask=torch.ones(5)), "text_attention_mask", "[5]"),
    (bad_inputs(lyric_attention_mask=None), "lyric_attention_mask", "missing"),
    (bad_inputs(refer_audio_latents=torch.zeros(1, 64)), "refer_audio_latents", "[1, 64]"),
    (bad_inputs(refer_audio_latents=torch.zeros(0, 1, 64)), "refer_audio_latents", "[0, 1, 64]"),
    (bad_inputs(text_token_ids=torch.zeros(4, dtype=torch.int64)), "text_token_ids", "[4]"),
    (bad_inputs(text_hidden_states=NAN_TEXT), "text_hidden_states", "NaN/Inf"),
])
def test_invalid_inputs_samples_name_file_key_found_expected_and_fix(tmp_path, data, key, found):
    with pytest.raises(DataError) as err:
        validate_sample(data, tmp_path / "bad.pt", WIDTHS, conditions=INPUTS)
    msg = str(err.value)
    assert "bad.pt" in msg and f"'{key}'" in msg and found in msg and "expected" in msg and "Fix:" in msg


# ------------------------------------------------------------------------------------------------ v3
def triples(dicts):
    return [(f"song {i}", d, d["metadata"]) for i, d in enumerate(dicts)]


def write(root, dicts, **kw):
    write_v3(triples(dicts), root, 30_000, fingerprint=FP, progress=False, **kw)
    lines = (root / INDEX_NAME).read_text().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


@pytest.mark.parametrize("use_mmap", [True, False])
def test_v3_inputs_round_trip_header_entries_and_int_dtypes(tmp_path, use_mmap):
    dicts = [inputs_dict(t=15 + 5 * i, ll=8 + i, r=1 + i % 2, id_dtype=torch.int32 if i else torch.int64,
                         token_ids=True, seed=i) for i in range(4)]
    header, entries = write(tmp_path / "v3", dicts)
    assert header["schema_version"] == 2 and header["conditions"] == ["encoder_inputs"]
    assert header["encoder_width"] is None and header["text_width"] == D
    assert header["token_id_max"] == max(int(d[k].max()) for d in dicts for k in ("lyric_token_ids", "text_token_ids"))
    assert entries[0]["L"] is None and entries[1]["tensors"]["lyric_token_ids"][0] == "int32"
    assert entries[0]["tensors"]["lyric_token_ids"][0] == "int64"
    src = V3Directory(tmp_path / "v3", WIDTHS, use_mmap=use_mmap, conditions=INPUTS)
    assert src.cond_lengths == [d["lyric_token_ids"].shape[0] + d["refer_audio_latents"].shape[0] + 6 for d in dicts]
    for i, d in enumerate(dicts):
        s = src[i]
        assert s.encoder_hidden_states is None and s.text_token_ids.dtype == torch.int64
        assert_set_equal(s, d, ("target_latents", "context_latents", "text_hidden_states", "refer_audio_latents"),
                         float_dtype=torch.bfloat16)  # stored dtype, as for encoder outputs
        assert torch.equal(s.lyric_token_ids, d["lyric_token_ids"].long()) and s.lyric_token_ids.dtype == torch.int64
        assert s.text_attention_mask.dtype == torch.bool  # masks keep the stored dtype too; collate converts
        assert torch.equal(s.text_attention_mask, d["text_attention_mask"])
    with pytest.raises(DataError, match=r"v3: carries no encoder_outputs condition set.*found encoder_inputs.*Fix: "
                       r"re-run scripts/preprocess\.py with preprocess\.store=outputs"):
        V3Directory(tmp_path / "v3", WIDTHS)


def test_v3_both_sets_read_each_set_without_mapping_the_other(tmp_path):
    dicts = [inputs_dict(t=20 + i, seed=i, outputs=True) for i in range(3)]
    header, entries = write(tmp_path / "v3", dicts)
    assert header["conditions"] == ["encoder_outputs", "encoder_inputs"]
    assert header["encoder_width"] == H and header["text_width"] == D and entries[0]["L"] == 9
    outs = V3Directory(tmp_path / "v3", WIDTHS)
    ins = V3Directory(tmp_path / "v3", WIDTHS, conditions=INPUTS)
    assert outs.cond_lengths == [9] * 3 and ins.cond_lengths == [10 + 1 + 6] * 3
    nbytes = lambda keys: sum(d[k].numel() * d[k].element_size() for d in dicts for k in keys)  # noqa: E731
    assert outs.nbytes == nbytes(COMMON + OUTPUT_KEYS) and ins.nbytes == nbytes(COMMON + INPUT_KEYS)
    for i, d in enumerate(dicts):
        o, n = outs[i], ins[i]
        assert all(getattr(o, k) is None for k in INPUT_KEYS) and n.encoder_hidden_states is None
        assert torch.equal(o.encoder_hidden_states, d["encoder_hidden_states"])
        assert torch.equal(n.text_hidden_states, d["text_hidden_states"])
        assert torch.equal(o.target_latents, n.target_latents)


def write_schema1(root, dicts):
    """A dataset as the schema-1 writer left it: the same shards and entries, and its header (no condition sets)."""
    header, _ = write(root, dicts)
    lines = (root / INDEX_NAME).read_text().splitlines()
    old = {"format": header["format"], "schema_version": 1, "num_samples": header["num_samples"],
           "encoder_width": header["encoder_width"], "checksum": header["checksum"],
           "tensor_bytes": header["tensor_bytes"], "shards": header["shards"]}
    (root / INDEX_NAME).write_text("\n".join([json.dumps(old)] + lines[1:]) + "\n")


def test_schema_1_dataset_still_reads_unchanged(tmp_path):
    dicts = [sample_dict(t=10 + i, width=H, seed=i) for i in range(3)]
    write_schema1(tmp_path / "v1", dicts)
    src = V3Directory(tmp_path / "v1", H)
    assert src.carried == [OUTPUTS] and src.cond_lengths == [9] * 3
    for i, d in enumerate(dicts):
        assert_set_equal(src[i], d, COMMON + OUTPUT_KEYS, float_dtype=torch.bfloat16)
    with pytest.raises(DataError, match="carries no encoder_inputs condition set.*found encoder_outputs"):
        V3Directory(tmp_path / "v1", WIDTHS, conditions=INPUTS)
    source = build_dataset(PreprocessedDataset(path=str(tmp_path / "v1")), CacheConfig(), WIDTHS)
    assert len(source) == 3 and torch.equal(source[2].target_latents, dicts[2]["target_latents"])


def test_v3_open_refuses_other_text_width_and_ids_beyond_the_vocabulary(tmp_path):
    write(tmp_path / "v3", [inputs_dict(t=10, seed=i) for i in range(2)])
    with pytest.raises(DataError, match=rf"text-encoder width does not match.*found D_text = {D}; expected D_text = 8"):
        V3Directory(tmp_path / "v3", replace(WIDTHS, text=8), conditions=INPUTS)
    with pytest.raises(DataError, match=r"token ids beyond the model's vocabulary.*expected ids < 5 .*Fix"):
        V3Directory(tmp_path / "v3", replace(WIDTHS, vocab=5), conditions=INPUTS)


@pytest.mark.parametrize("change, match", [
    (lambda h: h.update(schema_version=3), "unsupported schema_version; found 3; expected 1 or 2"),
    (lambda h: h.update(conditions=[]), "no valid condition sets"),
    (lambda h: h.update(conditions=["encoder_outputs"]), "no valid condition sets"),  # text_width without the set
    (lambda h: h.update(conditions=["encoder_inputs", "encoder_outputs"]), "no valid condition sets"),  # no H_enc
    (lambda h: h.update(conditions="encoder_inputs"), "no valid condition sets"),
    (lambda h: h.update(token_id_max="9"), "no valid condition sets"),
])
def test_v3_headers_with_inconsistent_condition_sets_are_refused(tmp_path, change, match):
    write(tmp_path / "v3", [inputs_dict(t=10)])
    lines = (tmp_path / "v3" / INDEX_NAME).read_text().splitlines()
    header = json.loads(lines[0])
    change(header)
    (tmp_path / "v3" / INDEX_NAME).write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
    with pytest.raises(DataError, match=f"index.jsonl: .*{match}.*Fix"):
        V3Directory(tmp_path / "v3", WIDTHS, conditions=INPUTS)


@pytest.mark.parametrize("second, match", [
    (lambda: sample_dict(t=10, width=H), "carries other condition sets than the first sample"),
    (lambda: inputs_dict(t=10, token_ids=True), "carries other condition sets"),
    (lambda: {**inputs_dict(t=10), "text_hidden_states": torch.zeros(6, D + 2)}, "text-encoder width differs"),
    (lambda: {**inputs_dict(t=10), "lyric_token_ids": torch.tensor([4, -2] * 5)}, "lyric_token_ids.*ids from -2"),
    (lambda: {**inputs_dict(t=10), "lyric_token_ids": torch.ones(10)}, "lyric_token_ids.*wrong dtype"),
])
def test_v3_write_refuses_mixed_sets_and_bad_inputs_naming_the_sample(tmp_path, second, match):
    with pytest.raises(DataError, match=f"sample 'song 1'.*{match}"):
        write_v3(triples([inputs_dict(t=10), second()]), tmp_path / "v3", fingerprint=FP, progress=False)
    assert not (tmp_path / "v3" / INDEX_NAME).exists()


# ------------------------------------------------------------------------------------------------ collate
def as_sample(key: str, d: dict, conditions=INPUTS) -> Sample:
    return validate_sample(d, f"{key}.pt", WIDTHS, key=key, conditions=conditions)


def test_collate_pads_captions_and_lyrics_and_packs_references():
    a = as_sample("a", inputs_dict(t=8, lt=4, ll=5, r=1, tr=3, seed=0))
    b = as_sample("b", inputs_dict(t=6, lt=6, ll=3, r=2, tr=3, seed=1))
    batch = collate([a, b])
    assert batch.encoder_hidden_states is None and batch.encoder_attention_mask is None
    assert batch.text_hidden_states.shape == (2, 6, D) and batch.text_attention_mask.shape == (2, 6)
    assert batch.lyric_token_ids.shape == (2, 5) and batch.lyric_token_ids.dtype == torch.int64
    assert batch.lyric_attention_mask.shape == (2, 5) and batch.text_token_ids is None
    assert batch.refer_audio_latents.shape == (3, 3, 64) and batch.refer_audio_order.tolist() == [0, 1, 1]
    assert torch.equal(batch.refer_audio_latents, torch.cat([a.refer_audio_latents, b.refer_audio_latents]))
    assert torch.equal(batch.lyric_token_ids[1], torch.cat([b.lyric_token_ids, torch.zeros(2, dtype=torch.int64)]))
    assert batch.lyric_attention_mask[1].tolist() == [1, 1, 1, 0, 0]
    assert batch.text_attention_mask[0].tolist() == [1, 1, 1, 0, 0, 0]  # its own last token masked, then padding
    assert torch.equal(batch.text_hidden_states[0, :4], a.text_hidden_states)
    assert torch.all(batch.text_hidden_states[0, 4:] == 0)
    for moved in (batch.float(), batch.to("cpu"), to_float32(batch, BatchBuffers(1))):
        assert moved.lyric_token_ids.dtype == moved.refer_audio_order.dtype == torch.int64
        assert moved.text_hidden_states.dtype == torch.float32 and moved.encoder_hidden_states is None
    assert len(batch.tensors()) == 11  # 3 common + 5 inputs fields + refer_audio_order + 2 lengths; None skipped
    assert batch.text_lengths.tolist() == [4, 6] and batch.lyric_lengths.tolist() == [5, 3]


def test_collate_with_buffers_and_bf16_keeps_ids_and_converts_floats():
    dicts = [inputs_dict(t=8 + i, r=1 + i, token_ids=True, seed=i) for i in range(3)]
    samples = [Sample(**{k: (v.to(torch.bfloat16) if v is not None and v.is_floating_point() else v)
                         for k, v in vars(as_sample(f"s{i}", d)).items() if k != "key"}, key=f"s{i}")
               for i, d in enumerate(dicts)]
    ring = BatchBuffers(2)
    for _ in range(2):  # the second round reuses the ring's memory
        batch = collate(samples, buffers=ring)
        assert batch.text_hidden_states.dtype == torch.bfloat16 and batch.text_token_ids.shape == (3, 6)
        assert batch.refer_audio_order.tolist() == [0, 1, 1, 2, 2, 2]
        fresh = collate(samples)
        assert all(torch.equal(x, y) for x, y in zip(batch.tensors(), fresh.tensors()))
        floats = to_float32(batch, BatchBuffers(1))
        assert floats.text_hidden_states.dtype == torch.float32 and floats.text_token_ids.dtype == torch.int64


def test_collate_refuses_other_reference_lengths_and_mixed_sets():
    a = as_sample("a", inputs_dict(t=8, tr=2))
    b = as_sample("b", inputs_dict(t=8, tr=3, seed=1))
    with pytest.raises(DataError, match=r"sample 'b'.*refer_audio_latents.*timbre reference length differs.*"
                       r"Tr = 2 as in sample 'a'.*Fix"):
        collate([a, b])
    outs = as_sample("c", sample_dict(t=8, width=H), conditions=OUTPUTS)
    with pytest.raises(ValueError, match="sample 'c' carries .*encoder_hidden_states.* but sample 'a' carries"):
        collate([a, outs])
    with_ids = as_sample("d", inputs_dict(t=8, tr=2, token_ids=True))
    with pytest.raises(ValueError, match="same condition sets"):
        collate([a, with_ids])


def test_crop_and_cache_byte_count_handle_inputs_samples():
    s = as_sample("a", inputs_dict(t=20))
    cropped = crop_sample(s, 5, 15)
    assert cropped.target_latents.shape[0] == 10 and cropped.lyric_token_ids is s.lyric_token_ids
    expected = sum(getattr(s, k).numel() * getattr(s, k).element_size() for k in COMMON + INPUT_KEYS)
    assert sample_nbytes(s) == expected


# ------------------------------------------------------------------------------------------------ synthetic
def test_synthetic_inputs_are_deterministic_with_the_outputs_targets():
    cfg = SyntheticDataset(num_samples=6, conditions=INPUTS, text_length=5, lyric_length=9)
    a, b = make_synthetic_samples(cfg, WIDTHS), make_synthetic_samples(cfg, WIDTHS)
    outs = make_synthetic_samples(replace(cfg, conditions=OUTPUTS), WIDTHS)
    for x, y, o in zip(a, b, outs):
        assert x.key == o.key and x.encoder_hidden_states is None and x.conditions == [INPUTS]
        assert all(torch.equal(getattr(x, k), getattr(y, k)) for k in COMMON + INPUT_KEYS)
        assert torch.equal(x.target_latents, o.target_latents) and torch.equal(x.context_latents, o.context_latents)
        assert x.text_hidden_states.shape == (5, D) and x.text_hidden_states.dtype == torch.float32
        assert x.lyric_token_ids.shape == (9,) and x.lyric_token_ids.dtype == torch.int64
        assert 0 <= int(x.lyric_token_ids.min()) and int(x.lyric_token_ids.max()) < V
        assert torch.equal(x.refer_audio_latents, torch.zeros(1, 1, 64))
        assert torch.all(x.text_attention_mask == 1) and torch.all(x.lyric_attention_mask == 1)
    assert len({tuple(s.lyric_token_ids.tolist()) for s in a}) == len(a)  # the lyrics tell the samples apart
    assert InMemorySource(a).cond_lengths == [9 + 1 + 5] * 6 == [synthetic_condition_length(cfg)] * 6
    assert synthetic_condition_length(replace(cfg, conditions=OUTPUTS)) == cfg.condition_length
    source = build_dataset(cfg, CacheConfig(), WIDTHS)
    assert torch.equal(source[3].lyric_token_ids, a[3].lyric_token_ids)
    with pytest.raises(ValueError, match="needs ConditionWidths"):
        make_synthetic_samples(cfg, H)
    batch = collate(a[:3])
    assert batch.refer_audio_order.tolist() == [0, 1, 2] and batch.refer_audio_latents.shape == (3, 1, 64)


def test_stream_and_prefetcher_hand_out_float32_batches_with_int64_ids():
    cfg = SyntheticDataset(num_samples=7, conditions=INPUTS)
    source = InMemorySource(make_synthetic_samples(cfg, WIDTHS))
    for background in (False, True):
        stream = BatchStream(source, LengthBucketSampler(source.lengths, 3, seed=0, shuffle=True),
                             max_frames=30, seed=1)
        pre = Prefetcher(stream, torch.device("cpu"), background=background)
        try:
            for _ in range(4):  # more batches than ring slots: reused memory stays right
                batch, _ = pre.next()
                assert batch.text_hidden_states.dtype == torch.float32 and batch.encoder_hidden_states is None
                assert batch.lyric_token_ids.dtype == batch.refer_audio_order.dtype == torch.int64
                assert batch.refer_audio_order.tolist() == list(range(len(batch.keys)))
                rows = [source[source.keys.index(k)] for k in batch.keys]
                assert all(torch.equal(batch.lyric_token_ids[i], s.lyric_token_ids) for i, s in enumerate(rows))
        finally:
            pre.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_prefetch_moves_inputs_batches_with_int64_ids():
    source = InMemorySource(make_synthetic_samples(SyntheticDataset(num_samples=7, conditions=INPUTS), WIDTHS))
    make = lambda: BatchStream(source, LengthBucketSampler(source.lengths, 3, seed=0, shuffle=True),  # noqa: E731
                               pin_memory=True)
    plain, pre = make(), Prefetcher(make(), torch.device("cuda"), device_prefetch=True)
    try:
        for _ in range(4):
            got, _ = pre.next()
            expected = plain.next_batch()
            assert got.lyric_token_ids.is_cuda and got.lyric_token_ids.dtype == torch.int64
            assert got.encoder_hidden_states is None and got.text_hidden_states.dtype == torch.float32
            assert torch.equal(got.refer_audio_order.cpu(), expected.refer_audio_order)
            assert torch.equal(got.text_hidden_states.cpu(), expected.text_hidden_states.float())
    finally:
        pre.close()


# ------------------------------------------------------------------------------------------------ fingerprint
def test_fingerprint_of_inputs_data_and_ignored_fields():
    data = make_fingerprint("turbo", "aaaa", None, "text", "tok", {})
    model = make_fingerprint("base", "bbbb", None, "text", "tok", {})
    assert len(compare_fingerprints(data, model)) == 2
    assert compare_fingerprints(data, model, ignore=ENCODER_INPUTS_IGNORE) == []
    other_text = make_fingerprint("base", "bbbb", None, "other", "tok", {})
    problems = compare_fingerprints(data, other_text, ignore=ENCODER_INPUTS_IGNORE)
    assert len(problems) == 1 and problems[0].startswith("text_encoder_digest")
    assert compare_fingerprints(FP, model) == []  # inputs-only data records no variant or encoder digest
    with pytest.raises(ValueError, match="condition_encoder.*names no compared field"):
        compare_fingerprints(data, model, ignore=("condition_encoder",))


# ------------------------------------------------------------------------------------------------ validate CLI
def run_json(capsys, root, *args):
    code = main(["--dataset-dir", str(root), "--json", "--no-progress", *args])
    return code, json.loads(capsys.readouterr().out)


def items(report, check):
    return [item for g in report["problems"] if g["check"] == check for item in g["items"]]


def test_validate_cli_on_inputs_and_both_data(tmp_path, capsys):
    write(tmp_path / "in", [inputs_dict(t=40 + i, seed=i) for i in range(3)])
    code, report = run_json(capsys, tmp_path / "in")
    assert code == 0 and report["errors"] == 0 and report["samples_read"] == 3
    assert report["conditions"] == {"all": ["encoder_inputs"], "some": [], "checked": "auto"}
    assert report["text_width"] == {"width": D, "source": "index.jsonl header"}
    code, report = run_json(capsys, tmp_path / "in", "--vocab-size", "3", "--text-width", str(D + 1))
    assert code == 1 and items(report, "token_id")[0]["key"] == "lyric_token_ids"
    assert items(report, "text_width")[0]["message"] == f"D_text = {D} for all samples, expected {D + 1} (--text-width)"
    code, report = run_json(capsys, tmp_path / "in", "--conditions", "encoder_outputs")
    assert code == 1 and len(items(report, "missing_set")) == 3

    save_pts(tmp_path / "both", [inputs_dict(t=40, outputs=True), inputs_dict(t=50, seed=1, outputs=True)])
    code, report = run_json(capsys, tmp_path / "both", "--conditions", "encoder_inputs")
    assert code == 0 and report["conditions"]["all"] == ["encoder_inputs", "encoder_outputs"]
    bad = inputs_dict(t=40, seed=2, outputs=True)
    bad["lyric_token_ids"] = bad["lyric_token_ids"].float()
    torch.save(bad, tmp_path / "both" / "s2.pt")
    code, report = run_json(capsys, tmp_path / "both")
    dtype, = items(report, "dtype")
    assert code == 1 and (dtype["sample"], dtype["key"]) == ("s2", "lyric_token_ids")


def test_validate_cli_refuses_inputs_on_outputs_only_data_with_the_fix(tmp_path, capsys):
    save_pts(tmp_path / "pt", [sample_dict(t=40, width=H, seed=i) for i in range(2)])
    code, report = run_json(capsys, tmp_path / "pt", "--conditions", "encoder_inputs")
    missing = items(report, "missing_set")
    assert code == 1 and len(missing) == 2 and report["conditions"]["all"] == ["encoder_outputs"]
    assert missing[0]["message"] == "carries no encoder_inputs condition set (it carries encoder_outputs)"
    assert "preprocess.store=inputs" in missing[0]["fix"]
    code = main(["--dataset-dir", str(tmp_path / "pt"), "--no-progress", "--conditions", "encoder_inputs"])
    text = capsys.readouterr().out
    assert code == 1 and "Condition sets: encoder_outputs (all samples); checked: encoder_inputs" in text
    assert "ERROR missing_set (2)" in text
    save_pts(tmp_path / "pt", [inputs_dict(t=40, seed=5)])  # s0.pt now holds encoder_inputs only
    code, report = run_json(capsys, tmp_path / "pt")
    assert code == 1 and "no condition set is carried by every sample" in items(report, "conditions")[0]["message"]
