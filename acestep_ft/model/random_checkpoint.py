"""A randomly initialised checkpoint directory in the official layout, written without ever building the model.

    from acestep_ft.model.random_checkpoint import model_config_for, write_random_checkpoint
    write_random_checkpoint(model_config_for("turbo"), "ckpt/random-turbo", seed=0)
    # or: python scripts/make_random_checkpoint.py --variant turbo ckpt/random-turbo

Real-size runs (memory, speed, loading) need a real-size checkpoint, and the official weights are not always at hand.
Building the 2B model in float32 and saving it would hold ~9.6 GB (XL: ~20 GB) plus a bf16 copy. Here the model
exists only on the meta device (shapes, no memory): the safetensors header is written first from those shapes,
then each tensor is drawn in float32, cast to bfloat16 and appended to the file, one at a time. Peak memory is the
largest single tensor (2B: decoder.time_embed.time_proj.weight, 25M values = 100 MB in float32), not the model.

The directory holds what `load_model` reads: `config.json` (as `official_config` writes it), `model.safetensors`
(bfloat16, every key and shape of the official state dict) and `silence_latent.pt` (zeros [1, 64, 15000]: a stand-in,
there is no VAE to encode real silence; preprocessing and official inference read it from there).

The values follow `AceStepModel.init_weights` (the official `_init_weights`): Linear weights N(0, 0.02) with zero
biases, RMSNorm weights one, convolutions torch's default, and each module's own initialisation for its other
parameters (`OWN_INIT_STD`). The weights are deterministic for a seed, but not equal to `AceStepModel(cfg)` under
the same torch seed (different draw order); they are random either way.
"""

from __future__ import annotations

import copy
import json
import math
import struct
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch
from omegaconf import OmegaConf
from torch import nn

from acestep_ft.atomic import atomic_directory

from .checkpoint_io import CONFIG_NAME, SILENCE_FRAMES, SILENCE_NAME, WEIGHTS_NAME, official_config
from .layers import RMSNorm
from .variants import build_meta_model

CONF_MODEL = Path(__file__).resolve().parents[2] / "conf" / "model"
# --variant name -> conf/model/<file>.yaml
VARIANT_FILES = {"tiny": "tiny", "turbo": "acestep15_turbo", "base": "acestep15_base", "sft": "acestep15_sft",
                 "xl_turbo": "acestep15_xl_turbo", "xl_base": "acestep15_xl_base", "xl_sft": "acestep15_xl_sft"}
SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


# Parameters that modules create themselves (not Linear / RMSNorm / convolution), by the last part of their name: the
# standard deviation of the normal draw their module uses, a number or a function of the shape (acestep_ft/model:
# decoder.py DiTLayer and AceStepDiTModel, encoder.py AceStepTimbreEncoder, tokenizer.py AttentionPooler and
# AudioTokenDetokenizer, acestep.py AceStepModel).
OWN_INIT_STD: Dict[str, Callable[[Tuple[int, ...]], float]] = {
    "scale_shift_table": lambda shape: shape[-1] ** -0.5,  # adaLN table: randn / sqrt(hidden)
    "null_condition_emb": lambda shape: 1.0,
    "encoder.timbre_encoder.special_token": lambda shape: 1.0,
    "tokenizer.attention_pooler.special_token": lambda shape: 0.02,
    "detokenizer.special_tokens": lambda shape: 0.02,
}
LINEAR_STD = 0.02  # the official _init_weights (initializer_range)


def model_config_for(variant: str) -> Any:
    """The typed ModelConfig of a variant as train.py composes it (conf/model/<variant's file>.yaml over the schema)."""
    from acestep_ft.config import ModelConfig

    if variant not in VARIANT_FILES:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANT_FILES)}")
    yaml = OmegaConf.load(CONF_MODEL / f"{VARIANT_FILES[variant]}.yaml")
    yaml.pop("defaults", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), yaml))


def _own_std(name: str, shape: Tuple[int, ...]) -> float:
    for suffix, std in OWN_INIT_STD.items():
        if name == suffix or name.endswith("." + suffix):
            return std(shape)
    raise ValueError(f"no initialisation known for parameter {name!r}: add its module's own init to OWN_INIT_STD in "
                     f"{Path(__file__).name}")


def _conv_default(module: nn.Module, g: torch.Generator) -> Dict[str, torch.Tensor]:
    """torch's default init of a convolution (kaiming-uniform weight, uniform bias) on a CPU copy of the module."""
    real = copy.deepcopy(module).to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):  # reset_parameters draws from the global RNG: seed it from ours
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=g, device=g.device)))
        real.reset_parameters()
    return {name: p.detach().to(g.device) for name, p in real.named_parameters(recurse=False)}


def _module_tensors(module: nn.Module, prefix: str, g: torch.Generator) -> Iterator[Tuple[str, torch.Tensor]]:
    """(state-dict key, float32 value) of the parameters `module` owns itself, drawn as its init would."""
    own = list(module.named_parameters(recurse=False))
    if not own:
        return
    if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
        yield from ((prefix + name, value) for name, value in _conv_default(module, g).items())
        return
    for name, p in own:
        shape = tuple(p.shape)
        if isinstance(module, nn.Linear) and name == "bias":
            value = torch.zeros(shape, device=g.device)
        elif isinstance(module, RMSNorm):
            value = torch.ones(shape, device=g.device)
        else:
            std = LINEAR_STD if isinstance(module, nn.Linear) else _own_std(prefix + name, shape)
            value = torch.empty(shape, device=g.device).normal_(0.0, std, generator=g)
        yield prefix + name, value


def random_tensors(model: nn.Module, seed: int, device: Any = "cpu") -> Iterator[Tuple[str, torch.Tensor]]:
    """Every state-dict tensor of the meta-device `model`, drawn one at a time in float32 on `device` (module
    order). The values depend on the seed and the device type (CPU and CUDA generators differ)."""
    g = torch.Generator(device=device).manual_seed(seed)
    for module_name, module in model.named_modules():
        yield from _module_tensors(module, f"{module_name}." if module_name else "", g)


def _header(specs: List[Tuple[str, Tuple[int, ...]]], dtype: torch.dtype, metadata: Dict[str, str]) -> bytes:
    """The safetensors header for tensors stored back to back in `specs` order, padded to 8 bytes as the format
    recommends (little-endian u64 length, then JSON)."""
    size = torch.empty((), dtype=dtype).element_size()
    entries: Dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * size
        entries[name] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape),
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def stream_safetensors(path: Path, specs: List[Tuple[str, Tuple[int, ...]]],
                       tensors: Iterator[Tuple[str, torch.Tensor]], dtype: torch.dtype = torch.bfloat16) -> int:
    """Write a safetensors file tensor by tensor: the header from `specs` (name, shape) first, then each tensor of
    `tensors` (which must come in `specs` order, with those shapes) cast to `dtype`. Returns the bytes written.

    safetensors' own save_file needs every tensor in memory at once; the format itself does not."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian values; writing them raw needs a little-endian machine")
    header = _header(specs, dtype, {"format": "pt"})
    written = 0
    with open(path, "wb") as f:
        f.write(header)
        for (name, shape), (got_name, value) in zip(specs, tensors, strict=True):
            if got_name != name or tuple(value.shape) != shape:
                raise ValueError(f"tensor {got_name} {list(value.shape)} arrived where the header has {name} "
                                 f"{list(shape)}")
            data = value.to(dtype).cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
            written += data.nbytes
    return len(header) + written


def write_random_checkpoint(cfg: Any, directory: Any, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                            device: Any = "cpu") -> Path:
    """Write `directory/` (config.json, model.safetensors in `dtype`, silence_latent.pt) for the architecture `cfg`
    describes (a ModelConfig, e.g. `model_config_for("turbo")`), atomically: a failed write leaves no directory.

    Keys and shapes are those of `build_meta_model(cfg).state_dict()`, checked against the drawn tensors while
    writing. Peak memory: the largest single tensor (float32 + its `dtype` copy), never the model. `device="cuda"`
    draws on a CUDA GPU (several times faster than a small CPU; other values for the same seed)."""
    meta = build_meta_model(cfg)
    specs = [(name, tuple(t.shape)) for name, t in meta.state_dict().items()]
    drawn = {name for name, _ in meta.named_parameters()}
    if drawn != {name for name, _ in specs}:  # persistent buffers or tied weights would need their own handling
        raise ValueError(f"state-dict keys that are not parameters: {sorted({n for n, _ in specs} - drawn)[:5]}")
    target = Path(directory)
    with atomic_directory(target) as tmp:
        # state-dict order is module order (each module's own parameters, then its children): the draws come in it
        stream_safetensors(tmp / WEIGHTS_NAME, specs, random_tensors(meta, seed, device), dtype)
        (tmp / CONFIG_NAME).write_text(json.dumps(official_config(meta, dtype), indent=2, sort_keys=True) + "\n")
        torch.save(torch.zeros(1, cfg.audio_acoustic_hidden_dim, SILENCE_FRAMES), tmp / SILENCE_NAME)
    return target
