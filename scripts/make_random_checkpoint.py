"""Write a randomly initialised ACE-Step 1.5 checkpoint directory in the official layout (for real-size smoke tests).

    python scripts/make_random_checkpoint.py --variant turbo ckpt/random-turbo
    python train.py model=acestep15_turbo model.path=ckpt/random-turbo

The directory holds config.json, model.safetensors (bfloat16, every official key and shape) and a zero
silence_latent.pt. The model is never built: tensors are drawn and written one at a time, so the 2B variant needs
~0.2 GB of RAM and 4.8 GB of disk (XL: 10 GB of disk). Exit status: 0 written, 1 the write failed, 2 usage.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from acestep_ft.model.random_checkpoint import VARIANT_FILES, model_config_for, write_random_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write (replaced atomically if it exists)")
    parser.add_argument("--variant", default="turbo", choices=sorted(VARIANT_FILES),
                        help="architecture, as train.py's model=... (turbo = model=acestep15_turbo; default turbo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--device", default="cpu",
                        help="where to draw the values: cpu (default) or cuda (faster; other values for the seed)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        out = write_random_checkpoint(model_config_for(args.variant), args.out_dir, seed=args.seed,
                                      device=args.device)
    except (OSError, RuntimeError) as err:  # disk full, no CUDA device
        print(f"could not write {args.out_dir}: {err}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in out.iterdir())
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"wrote {out} ({args.variant}, seed {args.seed}): {size / 1e9:.2f} GB in "
          f"{time.perf_counter() - started:.1f} s, peak RSS {peak_gb:.2f} GiB; train with: python train.py "
          f"model={VARIANT_FILES[args.variant]} model.path={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
