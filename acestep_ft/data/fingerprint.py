"""The preprocessing fingerprint: which model, encoders and settings produced a dataset, checked before training.

    fp = make_fingerprint("turbo", tensor_digest(encoder_state), vae_digest, None, None, {"max_duration": 240})
    write_fingerprint(dataset_dir, fp)                      # beside the shards, as fingerprint.json
    problems = compare_fingerprints(read_fingerprint(dataset_dir), model_fp)   # [] = compatible
    problems = compare_fingerprints(data_fp, model_fp, ignore=ENCODER_INPUTS_IGNORE)  # training on encoder_inputs

Cached `encoder_hidden_states` are only valid for the condition encoder that produced them: training computes
`tensor_digest` of the loaded model's `encoder.*` tensors and compares it with the data's. A field that either side does
not know (None or "unknown") is not compared, so a dataset converted from legacy `.pt` files (digests unknown) trains
with any model of its width, while a dataset preprocessed by acestep_ft is tied to its encoder.
The fingerprint of encoder_inputs data does not depend on the condition encoder's weights (nor on the model variant:
every variant reads the same caption states, lyric ids and VAE latents); it does depend on the VAE, the text encoder
and the tokenizer. Such data records None for model_variant and condition_encoder_digest when it carries only the
inputs; data carrying both sets records them (for its outputs), and a run on its inputs skips them with
`ignore=ENCODER_INPUTS_IGNORE`.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor

from acestep_ft.atomic import atomic_write_bytes
from acestep_ft.data.errors import data_error

PREPROCESS_SCHEMA_VERSION = 1
"""Bump when preprocessing changes what the stored tensors mean (prompt template, latent sampling, ...)."""
FINGERPRINT_NAME = "fingerprint.json"
CREATED_BY = "acestep_ft"
DIGEST_FIELDS = ("condition_encoder_digest", "vae_digest", "text_encoder_digest", "tokenizer_digest")
HASH_BUDGET_BYTES = 16 * 2**20
"""tensor_digest hashes at most about this many value bytes in total (strided samples of large tensors)."""
SMALL_TENSOR_BYTES = 64 * 2**10
"""Tensors up to this size are hashed whole (norms, biases: a changed value there is always seen)."""
_UNKNOWN = (None, "unknown", "")
COMPARED_FIELDS = ("schema_version", "model_variant", *DIGEST_FIELDS)
ENCODER_INPUTS_IGNORE = ("model_variant", "condition_encoder_digest")
"""What a run on encoder_inputs data does not compare: the condition encoder runs (and may train) in every step."""


def make_fingerprint(
    model_variant: Optional[str],
    condition_encoder_digest: Optional[str],
    vae_digest: Optional[str],
    text_encoder_digest: Optional[str],
    tokenizer_digest: Optional[str],
    settings: dict,
) -> dict:
    """A JSON-safe fingerprint dict; pass None for anything not known (it is then never compared), and for
    model_variant and condition_encoder_digest of data carrying only encoder_inputs (it does not depend on them)."""
    return {
        "schema_version": PREPROCESS_SCHEMA_VERSION,
        "created_by": CREATED_BY,
        "model_variant": model_variant,
        "condition_encoder_digest": condition_encoder_digest,
        "vae_digest": vae_digest,
        "text_encoder_digest": text_encoder_digest,
        "tokenizer_digest": tokenizer_digest,
        "settings": json.loads(json.dumps(settings, default=str)),
    }


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 hex[:16] over names, shapes and (a strided sample of) the values of a state dict.

    Deterministic and independent of dict order, device and storage dtype among floats: floating values are hashed as
    float32, so the same checkpoint loaded in bf16 (preprocessing on CUDA) or upcast to fp32 (training) gives the same
    digest. Tensors up to 64 KiB are hashed whole; larger ones with one common stride so that about 16 MiB of values
    are hashed in total (a model of any size digests in well under a second).
    """
    items = sorted(tensors.items())
    big = sum(t.numel() * 4 for _, t in items if t.numel() * 4 > SMALL_TENSOR_BYTES)
    stride = max(1, math.ceil(big / HASH_BUDGET_BYTES))
    h = hashlib.sha256()
    for name, t in items:
        t = t.detach()
        kind = "float" if t.is_floating_point() else str(t.dtype).removeprefix("torch.")
        h.update(json.dumps([name, kind, list(t.shape)]).encode())
        flat = t.reshape(-1)
        step = 1 if flat.numel() * 4 <= SMALL_TENSOR_BYTES else stride
        values = flat[::step].to("cpu")
        values = values.to(torch.float32) if t.is_floating_point() else values
        h.update(values.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _known(value: Any) -> bool:
    return value not in _UNKNOWN


_FIXES = {
    "schema_version": "re-run preprocessing (or scripts/convert_pt_to_v3.py) with this version of acestep_ft.",
    "model_variant": "train the model variant the data was preprocessed with, or re-run preprocessing with the "
    "checkpoint you train.",
    "condition_encoder_digest": "the cached encoder_hidden_states come from other condition-encoder weights: train "
    "that checkpoint, or re-run preprocessing with the checkpoint you train.",
}
_DEFAULT_FIX = "re-run preprocessing with the checkpoint and settings you train with."


def compare_fingerprints(data_fp: Optional[dict], model_fp: Optional[dict], ignore: Iterable[str] = ()) -> list[str]:
    """Human-readable differences between the data's fingerprint and the training side's; [] = compatible.

    Only fields both sides know are compared (None, "" or "unknown" on either side = not compared); `settings` are
    compared key by key for the keys both sides have. `created_by` is informational and never compared. `ignore`:
    fields of COMPARED_FIELDS not to compare (ENCODER_INPUTS_IGNORE for a run on encoder_inputs data); another name
    is a ValueError.
    """
    skipped = set(ignore)
    unknown = sorted(skipped - set(COMPARED_FIELDS))
    if unknown:
        raise ValueError(f"compare_fingerprints: ignore={unknown} names no compared field; choose from "
                         f"{list(COMPARED_FIELDS)}")
    data_fp, model_fp = data_fp or {}, model_fp or {}
    out: list[str] = []
    for name in (n for n in COMPARED_FIELDS if n not in skipped):
        a, b = data_fp.get(name), model_fp.get(name)
        if _known(a) and _known(b) and a != b:
            out.append(f"{name}: data has {a!r}, training has {b!r}. Fix: {_FIXES.get(name, _DEFAULT_FIX)}")
    a_set, b_set = data_fp.get("settings") or {}, model_fp.get("settings") or {}
    for key in sorted(set(a_set) & set(b_set)):
        a, b = a_set[key], b_set[key]
        if _known(a) and _known(b) and a != b:
            out.append(f"settings.{key}: data has {a!r}, training has {b!r}. Fix: {_DEFAULT_FIX}")
    return out


def write_fingerprint(directory: str | Path, fp: dict) -> Path:
    """Write `fp` as `directory/fingerprint.json` atomically; returns the path."""
    path = Path(directory) / FINGERPRINT_NAME
    atomic_write_bytes(path, (json.dumps(fp, indent=2, sort_keys=True) + "\n").encode())
    return path


def read_fingerprint(directory: str | Path) -> Optional[dict]:
    """The fingerprint of a dataset directory, or None when it has no fingerprint.json."""
    path = Path(directory) / FINGERPRINT_NAME
    try:
        fp = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except OSError as exc:  # a directory, no permission
        raise data_error(path, "cannot be read", found=exc.strerror or str(exc),
                         fix="make it a readable file, or re-run preprocessing / conversion.") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise data_error(path, "is not valid JSON", found=str(exc),
                         fix="restore the file, or re-run preprocessing / conversion.") from exc
    if not isinstance(fp, dict):
        raise data_error(path, "is not a fingerprint", found=type(fp).__name__, expected="a JSON object",
                         fix="restore the file, or re-run preprocessing / conversion.")
    return fp
