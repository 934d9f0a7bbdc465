"""Read and validate per-sample `.pt` files written by the official ACE-Step preprocessor or by Side-Step.

One file is a `torch.save`d dict (extra keys such as "metadata" are ignored):
    target_latents          [T, 64]     VAE latents, 25 frames/s
    attention_mask          [T]         1 = real frame
    encoder_hidden_states   [L, H_enc]  condition-encoder output
    encoder_attention_mask  [L]         1 = real token
    context_latents         [T, 128]    cat(silence latents, chunk mask)
Files are opened with `torch.load(path, weights_only=True, map_location="cpu")` (no arbitrary code runs).
Every tensor is converted to float32: bf16 / fp16 files (the preprocessor's CUDA compute dtype) and bool / int masks
come back as float32. A file that does not match the table above, whose H_enc differs from the model's encoder width,
or that holds NaN/Inf raises `DataError` naming the file, the key, what was found, what was expected and the fix.

`PtDirectory` is the map-style sample source over a whole directory (see `pt_index` for which files it reads).
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from acestep_ft.data.batch import Sample
from acestep_ft.data.errors import data_error
from acestep_ft.data.pt_index import SampleIndex, index_directory

REQUIRED_KEYS = (
    "target_latents",
    "attention_mask",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "context_latents",
)
MASK_KEYS = ("attention_mask", "encoder_attention_mask")
_REPROCESS = "re-run the ACE-Step / Side-Step preprocessing for this file, or remove it from the dataset."


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _to_float32(t: Tensor) -> Tensor:
    """float32, contiguous, and not a view into a larger storage (so cache byte counts are honest)."""
    out = t.to(dtype=torch.float32).contiguous()
    if out.untyped_storage().nbytes() > out.numel() * out.element_size():
        out = out.clone()
    return out


def _check_shapes(data: dict[str, Tensor], path: Path, encoder_width: int) -> None:
    target = data["target_latents"]
    if target.ndim != 2 or target.shape[1] != 64 or target.shape[0] < 1:
        raise data_error(path, "wrong shape", key="target_latents", found=_shape(target),
                         expected="[T, 64] with T >= 1 (VAE latents, 25 frames/s)", fix=_REPROCESS)
    t_len = target.shape[0]
    hidden = data["encoder_hidden_states"]
    if hidden.ndim != 2 or hidden.shape[0] < 1:
        raise data_error(path, "wrong shape", key="encoder_hidden_states", found=_shape(hidden),
                         expected="[L, H_enc] with L >= 1", fix=_REPROCESS)
    length, width = hidden.shape
    expected = {
        "attention_mask": ((t_len,), f"[T] = [{t_len}] (T from target_latents)"),
        "context_latents": ((t_len, 128), f"[T, 128] = [{t_len}, 128] (T from target_latents)"),
        "encoder_attention_mask": ((length,), f"[L] = [{length}] (L from encoder_hidden_states)"),
    }
    for key, (shape, text) in expected.items():
        if tuple(data[key].shape) != shape:
            raise data_error(path, "wrong shape", key=key, found=_shape(data[key]), expected=text, fix=_REPROCESS)
    if width != encoder_width:
        raise data_error(
            path, "condition-encoder width does not match the model", key="encoder_hidden_states",
            found=f"H_enc = {width} (shape {_shape(hidden)})", expected=f"H_enc = {encoder_width}",
            fix=f"train a model variant whose encoder_hidden_size is {width}, or re-run preprocessing with the "
            "checkpoint of the variant you train.",
        )


def validate_sample(obj: Any, path: str | Path, encoder_width: int, key: Optional[str] = None) -> Sample:
    """Check one loaded file's content against the table in the module docstring; return it as a float32 Sample."""
    path = Path(path)
    if not isinstance(obj, dict):
        raise data_error(path, "is not a sample file", found=f"a {type(obj).__name__}",
                         expected=f"a dict with keys {list(REQUIRED_KEYS)}",
                         fix="keep only per-sample .pt files of the preprocessor in the dataset directory.")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise data_error(path, "missing", key=", ".join(missing), found=f"keys {sorted(map(str, obj))}",
                         expected=f"all of {list(REQUIRED_KEYS)}", fix=_REPROCESS)
    for k in REQUIRED_KEYS:
        value = obj[k]
        if not isinstance(value, Tensor):
            raise data_error(path, "is not a tensor", key=k, found=type(value).__name__, expected="torch.Tensor",
                             fix=_REPROCESS)
        if k not in MASK_KEYS and not value.is_floating_point():
            raise data_error(path, "wrong dtype", key=k, found=str(value.dtype),
                             expected="a floating dtype (float32, bfloat16 or float16)", fix=_REPROCESS)
    _check_shapes(obj, path, encoder_width)
    data = {k: _to_float32(obj[k]) for k in REQUIRED_KEYS}
    for k, value in data.items():
        # amax of |x| is NaN or Inf exactly when some value is: one reduction, ~6x cheaper than isfinite().all()
        if value.numel() and not bool(torch.isfinite(value.abs().amax())):
            bad = int((~torch.isfinite(value)).sum())
            raise data_error(
                path, "non-finite values", key=k, found=f"{bad} NaN/Inf of {value.numel()} values",
                expected="finite values",
                fix="re-run preprocessing for this file (NaN/Inf usually means an fp16 overflow in the VAE or "
                "encoder; preprocess in bf16 or fp32), or remove it from the dataset.",
            )
    return Sample(key=key if key is not None else path.stem, **data)


def load_pt(path: Path, use_mmap: bool = False) -> Any:
    try:
        return torch.load(path, weights_only=True, map_location="cpu", mmap=use_mmap)
    except FileNotFoundError as exc:
        raise data_error(path, "file disappeared after the dataset was indexed",
                         fix="restore the file or restart training.") from exc
    except Exception as exc:  # corrupt zip, truncated write, pickled non-tensor objects, ...
        raise data_error(path, "cannot be read by torch.load(weights_only=True)",
                         found=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                         expected="a torch.save'd dict of tensors (plus an optional metadata dict)",
                         fix=_REPROCESS) from exc


def read_sample(path: str | Path, encoder_width: int, key: Optional[str] = None, use_mmap: bool = False) -> Sample:
    """Load one `.pt` file and validate it (see module docstring); raises DataError on any problem.

    `use_mmap` maps the file instead of reading it into a buffer first (one copy less; cache.policy=mmap).
    """
    path = Path(path)
    return validate_sample(load_pt(path, use_mmap), path, encoder_width, key=key)


def sample_lengths(path: Path) -> tuple[int, int]:
    """(T, L) of a .pt sample from its header and tensor metadata (memory-mapped: the tensor bytes are not read)."""
    obj = load_pt(path, use_mmap=True)
    shapes = []
    for key, expected in (("target_latents", "a [T, 64] tensor"), ("encoder_hidden_states", "an [L, H] tensor")):
        value = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(value, torch.Tensor) or value.ndim != 2:
            raise data_error(path, "missing or malformed", key=key, expected=expected, fix=_REPROCESS)
        shapes.append(int(value.shape[0]))
    return shapes[0], shapes[1]


class PtDirectory:
    """Map-style source over a preprocessed directory; files are read and validated on every `__getitem__`."""

    def __init__(self, path: str | Path, encoder_width: int, use_mmap: bool = False) -> None:
        self.index: SampleIndex = index_directory(path)
        self.encoder_width = encoder_width
        self.use_mmap = use_mmap
        self._lengths: Optional[list[tuple[int, int]]] = None

    def __len__(self) -> int:
        return len(self.index.paths)

    def __getitem__(self, i: int) -> Sample:
        n, i = len(self), operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples in {self.index.root}")
        i %= n
        return read_sample(self.index.paths[i], self.encoder_width, key=self.index.keys[i], use_mmap=self.use_mmap)

    @property
    def lengths(self) -> list[int]:
        """Latent frames T per sample (read once from the files' headers, for length bucketing)."""
        return [t for t, _ in self._shapes()]

    @property
    def cond_lengths(self) -> list[int]:
        """Condition tokens L per sample (from the same header pass)."""
        return [c for _, c in self._shapes()]

    def _shapes(self) -> list[tuple[int, int]]:
        if self._lengths is None:
            self._lengths = [sample_lengths(p) for p in self.index.paths]
        return self._lengths

    def location(self, i: int) -> str:
        return str(self.index.paths[i])

    @property
    def keys(self) -> list[str]:
        return list(self.index.keys)

    @property
    def paths(self) -> list[Path]:
        return list(self.index.paths)

    def __repr__(self) -> str:
        return f"PtDirectory({str(self.index.root)!r}, {len(self)} samples via {self.index.layout})"
