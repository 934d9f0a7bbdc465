"""Read and validate per-sample `.pt` files written by the official ACE-Step preprocessor, by Side-Step, or by
acestep_ft's preprocessing.

One file is a `torch.save`d dict (extra keys such as "metadata" are ignored) of the common tensors
    target_latents          [T, 64]       float  VAE latents, 25 frames/s
    attention_mask          [T]           mask   1 = real frame
    context_latents         [T, 128]      float  cat(silence latents, chunk mask)
and one or both condition sets (see `batch`):
  encoder_outputs (the official and Side-Step layout)
    encoder_hidden_states   [L, H_enc]    float  condition-encoder output
    encoder_attention_mask  [L]           mask   1 = real token
  encoder_inputs
    text_hidden_states      [Lt, D_text]  float  caption prompt through the text encoder (last_hidden_state)
    text_attention_mask     [Lt]          mask
    lyric_token_ids         [Ll]          ids    lyric tokens, each in [0, text vocabulary)
    lyric_attention_mask    [Ll]          mask
    refer_audio_latents     [R, Tr, 64]   float  timbre reference latents, R, Tr >= 1
    text_token_ids          [Lt]          ids    caption tokens (optional)
Files are opened with `torch.load(path, weights_only=True, map_location="cpu")` (no arbitrary code runs). A sample
is read for one set (`conditions`); the other set's tensors are not converted. float tensors must have a floating
dtype, ids an integer one, masks any (bool / int / float); floats and masks come back as float32 (bf16 / fp16 files
are the preprocessor's CUDA compute dtype), ids as int64. A file that does not match the table, whose H_enc or D_text
differs from the model's, that holds NaN/Inf or a token id outside [0, vocabulary), or that lacks the set the run
asks for raises `DataError` naming the file, the key, what was found, what was expected and the fix.

`PtDirectory` is the map-style sample source over a whole directory (see `pt_index` for which files it reads).
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from acestep_ft.config import Conditions
from acestep_ft.data.batch import (COMMON_KEYS, OPTIONAL_INPUT_KEYS, ConditionWidths, Sample, carried_sets,
                                   encoder_width_of, inputs_widths, sample_from, set_keys)
from acestep_ft.data.errors import DataError, data_error
from acestep_ft.data.pt_index import SampleIndex, index_directory

REQUIRED_KEYS = (
    "target_latents",
    "attention_mask",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "context_latents",
)
"""The keys of an official / Side-Step .pt file (common tensors + the encoder_outputs set)."""
FLOAT, MASK, IDS = "float", "mask", "ids"
SPEC: dict[str, tuple[tuple, str]] = {
    # key: (dims, kind); a name is a size shared across keys (>= 1), an int a fixed size
    "target_latents": (("T", 64), FLOAT),
    "attention_mask": (("T",), MASK),
    "context_latents": (("T", 128), FLOAT),
    "encoder_hidden_states": (("L", "H_enc"), FLOAT),
    "encoder_attention_mask": (("L",), MASK),
    "text_hidden_states": (("Lt", "D_text"), FLOAT),
    "text_attention_mask": (("Lt",), MASK),
    "lyric_token_ids": (("Ll",), IDS),
    "lyric_attention_mask": (("Ll",), MASK),
    "refer_audio_latents": (("R", "Tr", 64), FLOAT),
    "text_token_ids": (("Lt",), IDS),
}
MASK_KEYS = tuple(k for k, (_, kind) in SPEC.items() if kind == MASK)
KIND_DTYPES = {FLOAT: "a floating dtype (float32, bfloat16 or float16)",
               IDS: "an integer dtype (int64 or int32): token ids"}
_REPROCESS = ("re-run the preprocessing (scripts/preprocess.py, or the ACE-Step / Side-Step preprocessor) for this "
              "file, or remove it from the dataset.")
SET_FIX = {
    Conditions.encoder_inputs: "re-run scripts/preprocess.py with preprocess.store=inputs or preprocess.store=both, "
    "or set dataset.conditions=encoder_outputs to train on the stored condition-encoder outputs.",
    Conditions.encoder_outputs: "re-run scripts/preprocess.py with preprocess.store=outputs or preprocess.store=both, "
    "or set dataset.conditions=encoder_inputs to train from the condition encoder's inputs.",
}


def dtype_fits(kind: str, dtype: torch.dtype) -> bool:
    """Whether a tensor of `dtype` may hold a SPEC field of `kind`: floats floating, ids integer, masks any."""
    if kind == FLOAT:
        return dtype.is_floating_point
    if kind == IDS:
        return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
    return True


def _shape(t: Tensor | Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in (t.shape if isinstance(t, Tensor) else t)) + "]"


def sample_keys(sets: Sequence[Conditions], present: Sequence[str] = ()) -> list[str]:
    """The keys a sample of condition sets `sets` must have, in checking order, plus the optional keys among
    `present`."""
    keys = list(COMMON_KEYS)
    for c in sets:
        keys += [k for k in set_keys(c) if k not in OPTIONAL_INPUT_KEYS or k in present]
    return keys


def missing_set_error(where: str | Path, wanted: Conditions, carried: Sequence[Conditions]) -> DataError:
    """The run asks for a condition set the data does not carry."""
    has = " + ".join(str(c) for c in carried) or "no condition set"
    return data_error(where, f"carries no {wanted} condition set (dataset.conditions={wanted})", found=has,
                      expected=f"the keys {list(set_keys(wanted)[:5])}", fix=SET_FIX[Conditions(wanted)])


class ShapeMismatch(ValueError):
    """A tensor whose shape does not follow SPEC: `key`, the `found` shape and the `expected` text."""

    def __init__(self, key: str, found: str, expected: str) -> None:
        super().__init__(f"tensor {key} has shape {found}, expected {expected}")
        self.key, self.found, self.expected = key, found, expected


def check_shapes(shapes: Mapping[str, Sequence[int]], keys: Sequence[str]) -> dict[str, int]:
    """The named sizes (T, L, Lt, ...) of tensors whose shapes follow SPEC, checked in `keys` order; ShapeMismatch
    names the first key that does not (a size is fixed by the first key that has it)."""
    sizes: dict[str, tuple[int, str]] = {}  # name -> (size, key it came from)
    for key in keys:
        dims, shape = SPEC[key][0], tuple(shapes[key])
        ok = len(shape) == len(dims) and all(
            n == d if isinstance(d, int) else (n == sizes[d][0] if d in sizes else n >= 1)
            for d, n in zip(dims, shape))
        if not ok:
            known = [d for d in dims if isinstance(d, str) and d in sizes]
            text = _shape(dims)
            if known:
                text += f" = {_shape([sizes[d][0] if d in sizes else d for d in dims])} (" + ", ".join(
                    f"{d} from {sizes[d][1]}" for d in known) + ")"
            fresh = [d for d in dims if isinstance(d, str) and d not in sizes]
            text += f" with {', '.join(fresh)} >= 1" if fresh else ""
            raise ShapeMismatch(key, _shape(shape), text)
        for d, n in zip(dims, shape):
            if isinstance(d, str):
                sizes.setdefault(d, (n, key))
    return {d: n for d, (n, _) in sizes.items()}


def condition_length(sizes: Mapping[str, int], conditions: Conditions) -> int:
    """Tokens the decoder attends to: L (encoder_outputs), or Ll + R + Lt (the condition encoder's output length)."""
    if conditions == Conditions.encoder_outputs:
        return sizes["L"]
    return sizes["Ll"] + sizes["R"] + sizes["Lt"]


def width_error(where: str | Path, name: str, found: int, expected: int) -> DataError:
    if name == "H_enc":
        return data_error(where, "condition-encoder width does not match the model", key="encoder_hidden_states",
                          found=f"H_enc = {found}", expected=f"H_enc = {expected}",
                          fix=f"train a model variant whose encoder_hidden_size is {found}, or re-run preprocessing "
                          "with the checkpoint of the variant you train.")
    return data_error(where, "text-encoder width does not match the model", key="text_hidden_states",
                      found=f"D_text = {found}", expected=f"D_text = {expected} (model.text_hidden_dim)",
                      fix=f"train a model whose text_hidden_dim is {found}, or re-run scripts/preprocess.py with the "
                      "text encoder of the model you train.")


def check_structure(obj: Any, where: str | Path, sets: Sequence[Conditions], encoder_width: Optional[int] = None,
                    text_width: Optional[int] = None) -> dict[str, Tensor]:
    """The tensors of the common keys and of `sets` (text_token_ids when present) after checking keys, types,
    dtypes, shapes and widths (None = not checked); DataError naming `where` and the key otherwise."""
    if not isinstance(obj, Mapping):
        raise data_error(where, "is not a sample file", found=f"a {type(obj).__name__}",
                         expected=f"a dict with keys {list(REQUIRED_KEYS)}",
                         fix="keep only per-sample .pt files of the preprocessor in the dataset directory.")
    keys = sample_keys(sets, [k for k in OPTIONAL_INPUT_KEYS if k in obj])
    missing = [k for k in keys if k not in obj]
    if missing:
        raise data_error(where, "missing", key=", ".join(missing), found=f"keys {sorted(map(str, obj))}",
                         expected=f"all of {keys}", fix=_REPROCESS)
    for k in keys:
        value, kind = obj[k], SPEC[k][1]
        if not isinstance(value, Tensor):
            raise data_error(where, "is not a tensor", key=k, found=type(value).__name__, expected="torch.Tensor",
                             fix=_REPROCESS)
        if not dtype_fits(kind, value.dtype):
            raise data_error(where, "wrong dtype", key=k, found=str(value.dtype), expected=KIND_DTYPES[kind],
                             fix=_REPROCESS)
    try:
        sizes = check_shapes({k: obj[k].shape for k in keys}, keys)
    except ShapeMismatch as exc:
        raise data_error(where, "wrong shape", key=exc.key, found=exc.found, expected=exc.expected,
                         fix=_REPROCESS) from None
    for name, expected in (("H_enc", encoder_width), ("D_text", text_width)):
        if expected is not None and name in sizes and sizes[name] != expected:
            raise width_error(where, name, sizes[name], expected)
    return {k: obj[k] for k in keys}


def check_values(tensors: Mapping[str, Tensor], where: str | Path, vocab: Optional[int] = None) -> None:
    """Finite float values; token ids in [0, vocab) (only >= 0 when vocab is None); DataError otherwise."""
    for k, value in tensors.items():
        kind = SPEC[k][1]
        # amax of |x| is NaN or Inf exactly when some value is: one reduction, ~6x cheaper than isfinite().all()
        if kind == FLOAT and value.numel() and not bool(torch.isfinite(value.abs().amax())):
            bad = int((~torch.isfinite(value)).sum())
            raise data_error(
                where, "non-finite values", key=k, found=f"{bad} NaN/Inf of {value.numel()} values",
                expected="finite values",
                fix="re-run preprocessing for this file (NaN/Inf usually means an fp16 overflow in the VAE or "
                "encoder; preprocess in bf16 or fp32), or remove it from the dataset.",
            )
        if kind == IDS and value.numel():
            low, high = int(value.min()), int(value.max())
            if low < 0 or (vocab is not None and high >= vocab):
                bound = f"[0, {vocab}) (model.text_vocab_size)" if vocab is not None else ">= 0"
                raise data_error(where, "token id out of range", key=k, found=f"ids from {low} to {high}",
                                 expected=f"ids in {bound}",
                                 fix="tokenize with the model's text encoder and tokenizer (re-run scripts/"
                                 "preprocess.py with it), or set model.text_vocab_size to its vocabulary size.")


def _compact(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`dtype`, contiguous, and not a view into a larger storage (so cache byte counts are honest)."""
    out = t.to(dtype=dtype).contiguous()
    if out.untyped_storage().nbytes() > out.numel() * out.element_size():
        out = out.clone()
    return out


def validate_sample(obj: Any, path: str | Path, widths: int | ConditionWidths, key: Optional[str] = None,
                    conditions: Conditions = Conditions.encoder_outputs) -> Sample:
    """Check one loaded file's content (the common keys and the `conditions` set, see the module docstring) and
    return it as a Sample of that set: floats and masks float32, ids int64, the other set's fields None.

    `widths`: the model's H_enc (an int; encoder_outputs only) or its `ConditionWidths` (needed for encoder_inputs:
    D_text and the vocabulary are checked too)."""
    path = Path(path)
    wanted = Conditions(conditions)
    carried = carried_sets(obj) if isinstance(obj, Mapping) else []
    if carried and wanted not in carried:
        raise missing_set_error(path, wanted, carried)
    if wanted == Conditions.encoder_inputs:
        sizes = inputs_widths(widths, str(path))
        tensors = check_structure(obj, path, [wanted], text_width=sizes.text)
        vocab = sizes.vocab
    else:
        tensors, vocab = check_structure(obj, path, [wanted], encoder_width=encoder_width_of(widths)), None
    data = {k: _compact(t, torch.int64 if SPEC[k][1] == IDS else torch.float32) for k, t in tensors.items()}
    check_values(data, path, vocab)
    return sample_from(key if key is not None else path.stem, data)


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


def read_sample(path: str | Path, widths: int | ConditionWidths, key: Optional[str] = None, use_mmap: bool = False,
                conditions: Conditions = Conditions.encoder_outputs) -> Sample:
    """Load one `.pt` file and validate it for `conditions` (see `validate_sample`); raises DataError on any problem.

    `use_mmap` maps the file instead of reading it into a buffer first (one copy less; cache.policy=mmap).
    """
    path = Path(path)
    return validate_sample(load_pt(path, use_mmap), path, widths, key=key, conditions=conditions)


def sample_lengths(path: Path, conditions: Conditions = Conditions.encoder_outputs) -> tuple[int, int]:
    """(T, condition length) of a .pt sample from its header and tensor metadata (memory-mapped: the tensor bytes
    are not read); the condition length is L, or Ll + R + Lt for encoder_inputs (see `condition_length`)."""
    obj = load_pt(path, use_mmap=True)
    wanted = Conditions(conditions)
    carried = carried_sets(obj) if isinstance(obj, dict) else []
    if carried and wanted not in carried:
        raise missing_set_error(path, wanted, carried)
    first_dim = {"target_latents": "T", "encoder_hidden_states": "L", "text_hidden_states": "Lt",
                 "lyric_token_ids": "Ll", "refer_audio_latents": "R"}
    needed = ["target_latents"] + [k for k in set_keys(wanted) if k in first_dim]
    sizes = {}
    for key in needed:
        value = obj.get(key) if isinstance(obj, dict) else None
        dims = SPEC[key][0]
        if not isinstance(value, torch.Tensor) or value.ndim != len(dims):
            raise data_error(path, "missing or malformed", key=key, expected=f"a {_shape(dims)} tensor",
                             fix=_REPROCESS)
        sizes[first_dim[key]] = int(value.shape[0])
    return sizes["T"], condition_length(sizes, wanted)


class PtDirectory:
    """Map-style source over a preprocessed directory; files are read and validated on every `__getitem__`, for
    the condition set `conditions` (samples carry that set only)."""

    def __init__(self, path: str | Path, widths: int | ConditionWidths, use_mmap: bool = False,
                 conditions: Conditions = Conditions.encoder_outputs) -> None:
        self.index: SampleIndex = index_directory(path)
        self.conditions = Conditions(conditions)
        if self.conditions == Conditions.encoder_inputs:
            inputs_widths(widths, f"PtDirectory({str(self.index.root)!r})")
        self.widths = widths
        self.use_mmap = use_mmap
        self._lengths: Optional[list[tuple[int, int]]] = None

    def __len__(self) -> int:
        return len(self.index.paths)

    def __getitem__(self, i: int) -> Sample:
        n, i = len(self), operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples in {self.index.root}")
        i %= n
        return read_sample(self.index.paths[i], self.widths, key=self.index.keys[i], use_mmap=self.use_mmap,
                           conditions=self.conditions)

    @property
    def lengths(self) -> list[int]:
        """Latent frames T per sample (read once from the files' headers, for length bucketing)."""
        return [t for t, _ in self._shapes()]

    @property
    def cond_lengths(self) -> list[int]:
        """Condition tokens per sample, L or Ll + R + Lt (from the same header pass)."""
        return [c for _, c in self._shapes()]

    def _shapes(self) -> list[tuple[int, int]]:
        if self._lengths is None:
            self._lengths = [sample_lengths(p, self.conditions) for p in self.index.paths]
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
        return (f"PtDirectory({str(self.index.root)!r}, {len(self)} samples via {self.index.layout}, "
                f"{self.conditions})")
