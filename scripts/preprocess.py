"""Audio folder -> v3 dataset (index.jsonl + shards + fingerprint.json) with the checkpoint's own encoders.

    python scripts/preprocess.py model=acestep15_turbo model.path=/ckpt/acestep-v15-turbo \
        preprocess.input_dir=/music preprocess.output_dir=/data/music_v3 hardware=a100
    python scripts/preprocess.py ... preprocess.metadata_csv=/music/captions.csv preprocess.chunk_seconds=15

The VAE and text encoder default to the official layout beside the DiT (<model.path>/../vae,
<model.path>/../Qwen3-Embedding-0.6B). An interrupted run continues where it stopped when started again with the same
settings. Exit status: 0 when the dataset was written (skipped files are listed), 1 when no file could be processed
or the configuration / output directory was refused.
"""

import json
import sys
from pathlib import Path

import hydra
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from acestep_ft.config import register_configs  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="preprocess")
def main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from acestep_ft.preprocess import preprocess

    try:
        typed = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        raise SystemExit(f"Config: {err.full_key} is required; add {err.full_key}=... to the command line.") from None
    summary = preprocess(typed.preprocess, typed.model, typed.hardware)
    print(summary.text())
    report = {"ok": summary.ok, "encoded": summary.encoded, "resumed": summary.resumed, "skipped": summary.skipped,
              "audio_seconds": summary.audio_seconds, "seconds": summary.seconds, "output_dir": str(summary.output_dir)}
    (Path(HydraConfig.get().runtime.output_dir) / "preprocess_report.json").write_text(json.dumps(report, indent=2))
    if not summary.ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
