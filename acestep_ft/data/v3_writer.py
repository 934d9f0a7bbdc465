"""Write a v3 packed dataset (format: see `v3_reader`) from (name, tensors, metadata) triples.

    summary = write_v3(((name, tensors, metadata) for ...), out_dir, fingerprint=make_fingerprint(...))

A sample's tensors are named as in the .pt format (`pt_format`): the common ones plus one or both condition sets
(encoder_outputs: encoder_hidden_states + mask; encoder_inputs: text_hidden_states, text_attention_mask,
lyric_token_ids, lyric_attention_mask, refer_audio_latents, optionally text_token_ids). Every sample of one dataset
must carry the same sets (and text_token_ids in all or none), with one H_enc and one D_text. Every sample is validated
with the rules of `pt_format` (keys, dtypes, shapes, one T / L / Lt / Ll, finite values, ids >= 0; the vocabulary is
checked when the data is read, against the model's, with the header's "token_id_max") and stored in its original
dtype (token ids as int64, or int32 when given as int32). Crash safety: each shard is written as
`shard-NNNNN.tar.tmp`, fsynced and renamed when full; `fingerprint.json` and then `index.jsonl` are written last
(temp + rename), so an interrupted write leaves a directory that readers refuse ("no index.jsonl"); on an exception
the shards of this write are deleted.
An existing v3 dataset is replaced only with `overwrite=True` (its index is deleted first). A directory that holds
anything but v3 files is never written into (protects a .pt source directory given as the destination).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional
from urllib.parse import quote

import safetensors.torch
import torch
from torch import Tensor
from tqdm import tqdm

from acestep_ft.atomic import atomic_write_bytes, fsync_path
from acestep_ft.config import Conditions
from acestep_ft.data.batch import ID_KEYS, OPTIONAL_INPUT_KEYS, carried_sets
from acestep_ft.data.errors import data_error
from acestep_ft.data.fingerprint import FINGERPRINT_NAME, write_fingerprint
from acestep_ft.data.pt_format import check_structure, check_values
from acestep_ft.data.v3_reader import (CHECKSUMS, DEFAULT_CHECKSUM, FORMAT, FRAMES_PER_SECOND, INDEX_NAME,
                                       SCHEMA_VERSION, SHARD_PATTERN)

MAX_KEY_CHARS = 80  # + ".safetensors" stays within the 100-byte ustar name field (no pax headers)
_OURS = re.compile(r"^(shard-\d{5}\.tar(\.tmp)?|index\.jsonl|fingerprint\.json|\..*\.tmp)$")


@dataclass
class V3WriteSummary:
    path: Path
    num_samples: int
    num_shards: int
    tensor_bytes: int   # sum of the stored tensors' bytes
    file_bytes: int     # shard files on disk
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.file_bytes / 2**20 / max(self.seconds, 1e-9)


def safe_key(name: str) -> str:
    """A webdataset-safe member key for `name`: percent-escaped (no '.', '/'), long names cut + sha1 suffix."""
    key = quote(name, safe="").replace(".", "%2E")
    if len(key) > MAX_KEY_CHARS:
        key = key[: MAX_KEY_CHARS - 17] + "~" + hashlib.sha1(name.encode()).hexdigest()[:16]
    return key


def _sha1(text: Any) -> Optional[str]:
    return hashlib.sha1(text.encode()).hexdigest() if isinstance(text, str) else None


def _json_default(value: Any) -> Any:
    """JSON for what .pt metadata dicts hold beyond plain types: tensors / numpy values, paths, sets."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def json_safe(metadata: Mapping) -> dict:
    """The metadata exactly as it is stored in (and read back from) the sample's json member."""
    return json.loads(json.dumps(dict(metadata), default=_json_default, ensure_ascii=False))


class _ShardWriter:
    """Appends tar members to shard-NNNNN.tar.tmp; `close_shard` pads, fsyncs and renames it into place."""

    def __init__(self, root: Path, limit: int) -> None:
        self.root, self.limit, self.mtime = root, limit, int(time.time())
        self.done: list[dict] = []
        self.f = None

    def _member(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), self.mtime, 0o644
        header = info.tobuf(tarfile.USTAR_FORMAT)
        self.f.write(header)
        self.f.write(data)
        self.f.write(b"\0" * (-len(data) % 512))
        offset = self.pos + len(header)
        self.pos = offset + len(data) + (-len(data) % 512)
        return offset

    def add(self, key: str, tensors: bytes, meta: bytes) -> tuple[str, int, int]:
        """Write one sample's two members; returns (shard name, safetensors data offset, json data offset)."""
        size = len(tensors) + len(meta) + 4 * 512
        if self.f is not None and self.count and self.pos + size + 1024 > self.limit:
            self.close_shard()
        if self.f is None:
            self.name = SHARD_PATTERN.format(len(self.done))
            self.tmp = self.root / (self.name + ".tmp")
            self.f, self.pos, self.count = open(self.tmp, "wb"), 0, 0
        offsets = self._member(key + ".safetensors", tensors), self._member(key + ".json", meta)
        self.count += 1
        return self.name, *offsets

    def close_shard(self) -> None:
        self.f.write(b"\0" * 1024)  # end-of-archive marker
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.f = None
        os.replace(self.tmp, self.root / self.name)
        self.done.append({"name": self.name, "bytes": self.pos + 1024, "samples": self.count})

    def abort(self) -> None:
        if self.f is not None:
            self.f.close()
            self.tmp.unlink(missing_ok=True)
        for shard in self.done:
            (self.root / shard["name"]).unlink(missing_ok=True)


def _prepare(out: Path, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in out.iterdir())
    foreign = [n for n in names if not _OURS.match(n)]
    if foreign:
        raise data_error(out, "holds files that are not part of a v3 dataset", found=", ".join(foreign[:10]),
                         expected="an empty or new directory, or an existing v3 dataset",
                         fix="choose another output directory (never the .pt source directory).")
    if INDEX_NAME in names and not overwrite:
        raise data_error(out, "already holds a v3 dataset",
                         fix="choose another output directory, or pass overwrite=True (--overwrite) to replace it.")
    for name in [INDEX_NAME] + [n for n in names if n != INDEX_NAME]:  # the index first: never readable half-replaced
        (out / name).unlink(missing_ok=True)
    fsync_path(out)


@dataclass
class _Layout:
    """What the first sample fixed for the whole dataset: its condition sets and optional keys, and its widths."""

    sets: list[Conditions]
    optional: list[str]
    encoder_width: Optional[int]
    text_width: Optional[int]


def _stored(t: Tensor, key: str) -> Tensor:
    """The tensor as written: on the CPU, contiguous, own storage (safetensors refuses shared storage), token ids
    int64 unless they are int32."""
    t = t.detach().cpu().contiguous()
    if key in ID_KEYS and t.dtype not in (torch.int64, torch.int32):
        t = t.long()
    return t.clone() if t.untyped_storage().nbytes() != t.nbytes else t


def _layout_of(tensors: Any) -> _Layout:
    """The sets, optional keys and widths a sample carries (a sample with no set at all counts as encoder_outputs,
    so its missing keys are reported as the official file's)."""
    found = tensors if isinstance(tensors, Mapping) else {}
    widths = {k: int(t.shape[1]) for k in ("encoder_hidden_states", "text_hidden_states")
              for t in [found.get(k)] if isinstance(t, Tensor) and t.ndim == 2}
    return _Layout(carried_sets(found) or [Conditions.encoder_outputs], [k for k in OPTIONAL_INPUT_KEYS if k in found],
                   widths.get("encoder_hidden_states"), widths.get("text_hidden_states"))


def _check_layout(own: _Layout, first: _Layout, where: str) -> None:
    """A sample's sets, optional keys and widths must be the first sample's."""
    if (own.sets, own.optional) != (first.sets, first.optional):
        raise data_error(where, "carries other condition sets than the first sample",
                         found=" + ".join(own.sets) + f" {own.optional or ''}".rstrip(),
                         expected=" + ".join(first.sets) + f" {first.optional or ''}".rstrip(),
                         fix="preprocess every sample of one dataset with the same preprocess.store (and tokenizer "
                         "settings), or leave this sample out.")
    for key, name, a, b in (("encoder_hidden_states", "H_enc", own.encoder_width, first.encoder_width),
                            ("text_hidden_states", "D_text", own.text_width, first.text_width)):
        if a is not None and b is not None and a != b:
            what = "condition-encoder" if name == "H_enc" else "text-encoder"
            raise data_error(where, f"{what} width differs from the first sample's", key=key,
                             found=f"{name} = {a}", expected=f"{name} = {b}",
                             fix=f"all samples of one dataset come from one {what}; re-run preprocessing for this "
                             "sample with the same checkpoint, or leave it out.")


def _encode(name: str, tensors: Any, metadata: Any, first: Optional[_Layout],
            out: Path) -> tuple[dict, bytes, dict, _Layout]:
    """Validate one sample; returns (stored tensors, safetensors bytes, json-safe metadata, its layout)."""
    where = f"{out}: sample '{name}'"
    own = _layout_of(tensors)
    if first is not None:
        _check_layout(own, first, where)
    checked = check_structure(tensors, where, own.sets, own.encoder_width, own.text_width)
    check_values(checked, where)  # raises DataError naming the sample
    if metadata is not None and not isinstance(metadata, Mapping):
        raise data_error(where, "metadata is not a dict", key="metadata", found=type(metadata).__name__,
                         expected="a dict (caption, lyrics, duration, ...)", fix="pass a dict or None.")
    stored = {k: _stored(t, k) for k, t in checked.items()}
    return stored, safetensors.torch.save(stored), json_safe(metadata or {}), own


def write_v3(samples: Iterable[tuple[str, Mapping[str, Tensor], Optional[Mapping]]], out_dir: str | Path,
             shard_bytes: int = 256 * 2**20, *, fingerprint: dict, progress: bool = True,
             overwrite: bool = False) -> V3WriteSummary:
    """Write `samples` (name, tensors named as in the .pt, metadata dict) as a v3 dataset in `out_dir`; the
    condition sets of the first sample are the dataset's (every other sample must carry the same)."""
    out, start = Path(out_dir).expanduser(), time.perf_counter()
    _prepare(out, overwrite)
    shards, lines, seen, first, tensor_bytes, top_ids = _ShardWriter(out, shard_bytes), [], {}, None, 0, [-1]
    checksum = CHECKSUMS[DEFAULT_CHECKSUM]
    bar = tqdm(samples, desc=f"v3 write {out.name}", unit="sample", disable=not progress)
    try:
        for name, tensors, metadata in bar:
            stored, blob, meta, first = _encode(name, tensors, metadata, first, out)
            top_ids += [int(stored[k].max()) for k in ID_KEYS if k in stored]  # ids >= 0, Ll / Lt >= 1
            key = safe_key(name)
            if key in seen:
                raise data_error(out, f"sample name '{name}' is not unique",
                                 found=f"an earlier sample '{seen[key]}' with the same tar key '{key}'",
                                 expected="unique sample names", fix="rename one of the two samples.")
            seen[key] = name
            meta_blob = json.dumps({"name": name, "metadata": meta}, ensure_ascii=False).encode()
            shard, offset, json_offset = shards.add(key, blob, meta_blob)
            header_len = int.from_bytes(blob[:8], "little")
            layout = json.loads(blob[8: 8 + header_len])
            base = offset + 8 + header_len
            entry_tensors = {}
            for k, t in stored.items():
                begin, end = layout[k]["data_offsets"]
                entry_tensors[k] = [str(t.dtype).removeprefix("torch."), list(t.shape), base + begin, end - begin]
                tensor_bytes += end - begin
            t_len = stored["target_latents"].shape[0]
            l_len = stored["encoder_hidden_states"].shape[0] if "encoder_hidden_states" in stored else None
            lines.append(json.dumps({
                "key": key, "name": name, "shard": shard, "offset": offset, "length": len(blob),
                "checksum": f"{checksum(blob):x}", "T": t_len, "L": l_len,
                "duration_s": round(t_len / FRAMES_PER_SECOND, 3), "caption_sha1": _sha1(meta.get("caption")),
                "lyrics_sha1": _sha1(meta.get("lyrics")), "json": [json_offset, len(meta_blob)],
                "tensors": entry_tensors}, ensure_ascii=False, separators=(",", ":")))
            mb = (sum(s["bytes"] for s in shards.done) + shards.pos) / 2**20
            bar.set_postfix_str(f"{mb / max(time.perf_counter() - start, 1e-9):.0f} MB/s", refresh=False)
        if not lines:
            raise data_error(out, "no samples to write", fix="check the source directory / sample iterator.")
        shards.close_shard()
        fsync_path(out)
        header = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "num_samples": len(lines),
                  "conditions": [str(c) for c in first.sets], "encoder_width": first.encoder_width,
                  "text_width": first.text_width, "token_id_max": max(top_ids) if len(top_ids) > 1 else None,
                  "checksum": DEFAULT_CHECKSUM, "tensor_bytes": tensor_bytes, "shards": shards.done}
        write_fingerprint(out, fingerprint)
        atomic_write_bytes(out / INDEX_NAME, "\n".join([json.dumps(header)] + lines).encode() + b"\n")
        fsync_path(out)
    except BaseException:
        shards.abort()
        (out / FINGERPRINT_NAME).unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return V3WriteSummary(out, len(lines), len(shards.done), tensor_bytes, sum(s["bytes"] for s in shards.done),
                          time.perf_counter() - start)
