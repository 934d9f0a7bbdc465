"""Audio folder -> v3 dataset (index.jsonl + shards + fingerprint.json) with the checkpoint's own encoders.

    python scripts/preprocess.py model=acestep15_turbo model.path=/ckpt/acestep-v15-turbo \
        preprocess.input_dir=/music preprocess.output_dir=/data/music_v3 hardware=a100
    python scripts/preprocess.py ... preprocess.metadata_csv=/music/captions.csv preprocess.chunk_seconds=15
    python scripts/preprocess.py ... preprocess.store=inputs    # condition-encoder inputs: trainable encoder

The VAE and text encoder default to the official layout beside the DiT (<model.path>/../vae,
<model.path>/../Qwen3-Embedding-0.6B; preprocess.vae_path / model.text_encoder_path override). An interrupted run continues where it stopped when started again with the same
settings. Exit status: 0 when the dataset was written (skipped files are listed), 1 when no file could be processed,
the output directory or the checkpoint was refused or could not be loaded, 2 for a usage / config error (an override
Hydra refuses, a required setting missing, a path on the command line that does not exist); errors print their message
only (HYDRA_FULL_ERROR=1 adds the traceback).
"""

import json
import sys
from pathlib import Path

import hydra

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from acestep_ft.config import register_configs, to_typed  # noqa: E402
from acestep_ft.errors import reported_errors  # noqa: E402

register_configs()
_started = False  # set once Hydra has composed the config and runs main()


@hydra.main(version_base="1.3", config_path="../conf", config_name="preprocess")
def main(cfg) -> None:
    global _started
    _started = True
    from hydra.core.hydra_config import HydraConfig

    from acestep_ft.preprocess import preprocess

    with reported_errors():  # a refusal exits 1, a config error 2: the message only
        typed = to_typed(cfg)
        summary = preprocess(typed.preprocess, typed.model, typed.hardware)
        print(summary.text())
        report = {"ok": summary.ok, "encoded": summary.encoded, "resumed": summary.resumed, "skipped": summary.skipped,
                  "audio_seconds": summary.audio_seconds, "seconds": summary.seconds,
                  "output_dir": str(summary.output_dir)}
        (Path(HydraConfig.get().runtime.output_dir) / "preprocess_report.json").write_text(json.dumps(report, indent=2))
    if not summary.ok:
        raise SystemExit(1)  # the summary above says why


if __name__ == "__main__":
    try:
        main()
    except SystemExit as stopped:
        if stopped.code == 1 and not _started:  # Hydra refused the command line (unknown key, bad value): usage
            raise SystemExit(2) from None
        raise
