"""Convert an adapter between PEFT (official ACE-Step inference) and ComfyUI's layout (strength 1.0 = the update).

    python scripts/convert_adapter.py --to comfyui PEFT_DIR OUT.safetensors [--base CHECKPOINT]
    python scripts/convert_adapter.py --to peft IN.safetensors OUT_DIR [--base CHECKPOINT] [--ignore-metadata]

PEFT_DIR holds adapter_config.json + adapter_model.safetensors (a run's export/ or a checkpoint's adapter/). IN is a
ComfyUI-layout file (ours, Side-Step's or LyCORIS' export, or a bare PEFT adapter_model.safetensors, which ComfyUI
plays at scale 1). --base (the official model.safetensors / its directory, or ComfyUI's single-file model) is needed
for DoRA only: ComfyUI's dora_scale is relative to the base weights. The rules are in acestep_ft/train/comfyui.py.
Exit status: 0 written; 1 the input cannot be read or converted (the message names the key); 2 usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors import SafetensorError, safe_open

from acestep_ft.errors import ConfigError, UserError, reported_errors
from acestep_ft.train.comfyui import ADAPTER_CONFIG, ADAPTER_WEIGHTS, describe, to_comfyui, write_comfyui, write_peft


def read_base(path: Path) -> Dict[str, torch.Tensor]:
    """Decoder weights "<module>.weight" from a checkpoint file or directory (keys decoder.* or
    diffusion_model.decoder.*)."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise UserError(f"--base {path}: no .safetensors checkpoint there. Fix: give the model.safetensors (or its "
                        "directory) the adapter was trained on.")
    out = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key.endswith(".weight") and "decoder." in key:
                    out[key.split("decoder.", 1)[1]] = f.get_tensor(key)
    if not out:
        raise UserError(f"--base {path}: no decoder.* weights in it. Fix: give the full DiT checkpoint.")
    return out


def convert(direction: str, src: Path, dst: Path, base: Optional[Dict[str, torch.Tensor]], use_metadata: bool) -> str:
    """Write `dst`; returns the line that says what was written."""
    if direction == "comfyui":
        if not (src / ADAPTER_CONFIG).is_file() or not (src / ADAPTER_WEIGHTS).is_file():
            raise UserError(f"{src} is no PEFT adapter directory (needs {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}). Fix: "
                            "give a run's export/ or checkpoints/step-N/adapter/.")
        tensors = write_comfyui(src, dst, base)
        return f"wrote {dst} (ComfyUI layout): {describe(tensors)}; strength 1.0 = the trained update"
    if not src.is_file() or src.suffix != ".safetensors":
        raise UserError(f"{src} is no .safetensors file. Fix: give the ComfyUI adapter file.")
    peft, config = write_peft(src, dst, base, use_metadata)
    alpha = config.get("lora_alpha", config.get("alpha"))
    extra = "".join(f", {k} for {len(config[k])} modules" for k in ("rank_pattern", "alpha_pattern") if config.get(k))
    comfy = to_comfyui(peft, config, base) if base is not None or not config.get("use_dora") else None
    modules = {k.rsplit(".lora_", 1)[0].rsplit(".lokr_", 1)[0].rsplit(".hada_", 1)[0] for k in peft}
    return (f"wrote {dst} (PEFT {config['peft_type']}): {len(modules)} modules, "
            f"r={config['r']}, alpha={alpha}{extra}" + (f"; as ComfyUI plays it: {describe(comfy)}" if comfy else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--to", required=True, choices=["comfyui", "peft"], help="the layout to write")
    parser.add_argument("src", type=Path,
                        help="PEFT adapter directory (--to comfyui) or ComfyUI .safetensors (--to peft)")
    parser.add_argument("dst", type=Path, help="output .safetensors file (--to comfyui) or directory (--to peft)")
    parser.add_argument("--base", type=Path, help="base checkpoint (file or directory), needed for DoRA only")
    parser.add_argument("--ignore-metadata", action="store_true",
                        help="--to peft: derive the config from the tensors, not from the config stored at export")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    with reported_errors():
        src, dst = args.src.expanduser(), args.dst.expanduser()
        if not src.exists():
            raise UserError(f"{src} does not exist.")
        if dst.exists() and not args.overwrite:
            raise ConfigError(f"{dst} exists. Fix: pass --overwrite or give a new path.")
        try:
            base = read_base(args.base.expanduser()) if args.base else None
            print(convert(args.to, src, dst, base, not args.ignore_metadata))
        except (ValueError, SafetensorError) as err:  # the converter names the offending key
            raise UserError(f"{src}: {err}") from err
        except OSError as err:
            raise UserError(f"{err.filename or dst}: {err.strerror or err}. Fix: check the path, its permissions "
                            "and the free disk space.") from err
    return 0


if __name__ == "__main__":
    sys.exit(main())
