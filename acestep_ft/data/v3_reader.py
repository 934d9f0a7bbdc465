"""The v3 packed dataset format, and its reader `V3Directory` (zero-copy mmap views, checksummed).

A v3 dataset is a directory (written by `v3_writer.write_v3`, e.g. via `scripts/convert_pt_to_v3.py`):
    shard-00000.tar, shard-00001.tar, ...   plain POSIX tars, webdataset convention, members stored uncompressed
    fingerprint.json                        which model / encoders / settings produced the data (see `fingerprint`)
    index.jsonl                             written LAST: a directory without it is not (yet) a v3 dataset
Per sample, two consecutive tar members named `<key>.safetensors` (the tensors of the sample, named as in the .pt
format, see `pt_format`: the common ones plus the condition sets the dataset carries, in their original dtype: bf16
stays bf16, token ids int64 or int32) and `<key>.json` (`{"name": original name, "metadata": the .pt metadata
dict}`). Every sample of one dataset carries the same condition sets.
`<key>` is the original name made webdataset-safe (no dots or slashes: percent-escaped, long names shortened with a
hash); the original name is the sample's `key` everywhere in acestep_ft. So standard tools work:
    webdataset.WebDataset(shard_paths)  ->  {"__key__", "safetensors": bytes, "json": bytes}
    safetensors.torch.load(sample["safetensors"])  ->  the tensors
index.jsonl line 1 is the header:
    {"format": "acestep-ft-v3", "schema_version": 2, "num_samples": N,
     "conditions": ["encoder_outputs", "encoder_inputs"] (the sets every sample carries),
     "encoder_width": H_enc (null without encoder_outputs), "text_width": D_text (null without encoder_inputs),
     "token_id_max": largest lyric / caption token id (null without encoder_inputs),
     "checksum": "xxh3_64" | "crc32", "tensor_bytes": total, "shards": [{"name", "bytes", "samples"}, ...]}
then one line per sample, in dataset order:
    {"key", "name", "shard": file name, "offset", "length": the safetensors member's data in the shard file,
     "checksum": hex of the member bytes, "T", "L" (of encoder_hidden_states; null without encoder_outputs),
     "duration_s": T / 25, "caption_sha1", "lyrics_sha1" (or null), "json": [offset, length] of the json member,
     "tensors": {field: [dtype, shape, offset, nbytes]}}     offsets are absolute byte positions in the shard file
so a reader maps a tensor straight from the file without parsing the tar or the safetensors header. Schema 1 (before
encoder_inputs) is read unchanged: its header has no "conditions" (= ["encoder_outputs"]), "text_width" or
"token_id_max".

    src = V3Directory(path, 2048)                    # opens: header, shard sizes, widths checked; no data read
    src = V3Directory(path, ConditionWidths(2048, 1024, 151669), conditions="encoder_inputs")
    src.lengths, src.cond_lengths                    # T and condition length per sample, from the index
    sample = src[i]                                  # tensors are views into an mmap of the shard (stored dtype)
A source hands out one condition set (`conditions`); the other set's tensors are neither mapped nor checked.
Sample tensors keep the stored dtype (collate converts to float32 while copying; int32 ids become int64 copies) and
must not be modified in place:
the private (copy-on-write) mapping keeps the file intact, but a changed view then fails its checksum on re-read.
Shards must stay unchanged while open: each read checks the shard's current size (a DataError, not a SIGBUS, when it
was truncated), but views already handed out still point into the mapping.
"""

from __future__ import annotations

import json
import math
import mmap
import operator
import os
import re
import zlib
from pathlib import Path
from typing import Literal, Optional

import torch

from acestep_ft.config import Conditions
from acestep_ft.data.batch import (OPTIONAL_INPUT_KEYS, ConditionWidths, Sample, encoder_width_of, inputs_widths,
                                   sample_from)
from acestep_ft.data.errors import DataError, data_error
from acestep_ft.data.fingerprint import FINGERPRINT_NAME, read_fingerprint
from acestep_ft.data.pt_format import (IDS, KIND_DTYPES, SPEC, check_shapes, check_values, condition_length,
                                       dtype_fits, missing_set_error, sample_keys, width_error)

try:
    import xxhash
except ImportError:  # pragma: no cover - xxhash is installed with acestep_ft; crc32 keeps the format usable without
    xxhash = None

FORMAT = "acestep-ft-v3"
SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # 1: encoder_outputs only, no "conditions" in the header
INDEX_NAME = "index.jsonl"
SHARD_PATTERN = "shard-{:05d}.tar"
FRAMES_PER_SECOND = 25
CHECKSUMS = {"crc32": zlib.crc32}
if xxhash is not None:
    CHECKSUMS.update(xxh3_64=xxhash.xxh3_64_intdigest, xxh64=xxhash.xxh64_intdigest)
DEFAULT_CHECKSUM = "xxh3_64" if xxhash is not None else "crc32"
_RECONVERT = "re-run scripts/convert_pt_to_v3.py (or the preprocessing that wrote this dataset)."


def _not_v3(root: Path) -> DataError:
    shards = sorted(p.name for p in root.glob("shard-*.tar*")) if root.is_dir() else []
    found = f"{len(shards)} shard files ({shards[0]} ...) but no {INDEX_NAME}" if shards else f"no {INDEX_NAME}"
    why = ": a v3 write that did not finish (the index is written last)" if shards else ""
    return data_error(root, f"is not a v3 dataset{why}", found=found,
                      expected=f"{INDEX_NAME} + shard-*.tar + {FINGERPRINT_NAME}", fix=_RECONVERT)


def detect_format(path: str | Path) -> Literal["v3_sharded", "pt"]:
    """"v3_sharded" when the directory has index.jsonl, "pt" when it has .pt files or manifest.json, else DataError."""
    root = Path(path).expanduser()
    if root.is_file():
        root = root.parent
    if not root.is_dir():
        raise data_error(root, "dataset directory does not exist", fix="set dataset.path to a dataset directory.")
    if (root / INDEX_NAME).is_file():
        return "v3_sharded"
    if any(root.glob("shard-*.tar*")):
        raise _not_v3(root)
    if (root / "manifest.json").is_file() or any(root.glob("*.pt")):
        return "pt"
    names = sorted(p.name for p in root.iterdir())
    listing = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "") or "nothing"
    raise data_error(root, "is not a dataset directory", found=listing,
                     expected=f"{INDEX_NAME} + shard-*.tar (v3) or *.pt files / manifest.json (official, Side-Step)",
                     fix="point dataset.path at the output of preprocessing or of scripts/convert_pt_to_v3.py.")


_WILLNEED = getattr(mmap, "MADV_WILLNEED", None)
SHARD_NAME = re.compile(r"shard-\d{5}\.tar")


def _count(x: object) -> int:
    """A non-negative integer from the index (sizes, offsets, dims), or ValueError."""
    if type(x) is not int or x < 0:
        raise ValueError(f"{x!r} is not a non-negative integer")
    return x


def _entry_sizes(shapes: dict, keys: list[str], encoder_width: Optional[int], text_width: Optional[int]) -> dict:
    """The named sizes (T, L, Lt, ...) of a sample whose tensor shapes are the documented ones and whose widths are
    the expected ones (None = not checked), else ValueError naming the field."""
    sizes = check_shapes(shapes, keys)
    for name, want in (("H_enc", encoder_width), ("D_text", text_width)):
        if want is not None and name in sizes and sizes[name] != want:
            raise ValueError(f"{name} = {sizes[name]} differs from the header's {want}")
    return sizes


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


class V3Directory:
    """Map-style `SampleSource` over a v3 directory (see module docstring); picklable and safe across fork."""

    def __init__(self, path: str | Path, widths: int | ConditionWidths, verify_checksums: str | bool = "always",
                 use_mmap: bool = True, conditions: Conditions = Conditions.encoder_outputs) -> None:
        """widths: the model's H_enc (an int; encoder_outputs only) or ConditionWidths (needed for encoder_inputs).
        verify_checksums: "always" (every read), "first_read" (once per sample and process), "never"; True /
        False = always / never. conditions: the set the samples carry (DataError when the dataset has not got it)."""
        self.root = Path(path).expanduser()
        verify = {True: "always", False: "never"}.get(verify_checksums, str(verify_checksums))
        if verify not in ("always", "first_read", "never"):
            raise ValueError(f"verify_checksums={verify_checksums!r}: expected always, first_read or never")
        self.verify_checksums, self.use_mmap = verify != "never", use_mmap
        self.sets = [Conditions(conditions)]
        self.encoder_width: Optional[int] = encoder_width_of(widths)
        self.text_width: Optional[int] = None
        self.vocab: Optional[int] = None
        if self.sets == [Conditions.encoder_inputs]:
            model = inputs_widths(widths, f"V3Directory({str(self.root)!r})")
            self.encoder_width, self.text_width, self.vocab = None, model.text, model.vocab
        self.verify_once = verify == "first_read"
        self._verified: set[int] = set()  # first_read: indices this process has checked (a fork inherits them)
        index = self.root / INDEX_NAME
        if not index.is_file():
            raise _not_v3(self.root)
        lines = index.read_bytes().splitlines()
        header = self._header(index, lines)
        self._check_model(index, header)
        self.checksum_name = header["checksum"]
        if verify_checksums and self.checksum_name not in CHECKSUMS:
            raise data_error(index, "checksum algorithm not available", found=repr(self.checksum_name),
                             expected=f"one of {sorted(CHECKSUMS)}",
                             fix="pip install xxhash, or set dataset.verify_checksums=never.")
        self.shards = [s["name"] for s in header["shards"]]
        sizes = [s["bytes"] for s in header["shards"]]
        for name, size in zip(self.shards, sizes):
            shard = self.root / name
            actual = shard.stat().st_size if shard.is_file() else None
            if actual != size:
                raise data_error(shard, "missing" if actual is None else "truncated or changed",
                                 found="no file" if actual is None else f"{actual} bytes",
                                 expected=f"{size} bytes (index.jsonl)", fix=_RECONVERT)
        self.fingerprint: dict = read_fingerprint(self.root)
        if self.fingerprint is None:
            raise data_error(self.root / FINGERPRINT_NAME, "missing", expected="written with the shards",
                             fix="restore fingerprint.json, or " + _RECONVERT)
        self._read_entries(index, lines[1:], sizes)
        self._reset()

    def _header(self, index: Path, lines: list[bytes]) -> dict:
        """Line 1, checked for form (format, schema, counts, shard names, condition sets); schema 1 headers get
        "conditions": ["encoder_outputs"]. Sets `self.carried`, the condition sets the dataset carries."""
        try:
            header = json.loads(lines[0]) if lines else None
            ok = header["format"] == FORMAT and isinstance(header["shards"], list)
            version, n = header["schema_version"], header["num_samples"]
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise data_error(index, "line 1 is not a v3 header", found=repr(lines[0][:120]) if lines else "empty file",
                             expected=f'{{"format": "{FORMAT}", "schema_version", "num_samples", "shards", ...}}',
                             fix=_RECONVERT)
        if version not in READABLE_SCHEMAS:
            raise data_error(index, "unsupported schema_version", found=str(version),
                             expected=" or ".join(map(str, READABLE_SCHEMAS)),
                             fix="update acestep_ft, or " + _RECONVERT)
        if version == 1:
            header = {**header, "conditions": [Conditions.encoder_outputs.value], "text_width": None,
                      "token_id_max": None}
        self.carried = self._carried(index, header)
        if n != len(lines) - 1:
            raise data_error(index, "sample count does not match the header", found=f"{len(lines) - 1} sample lines",
                             expected=f"num_samples = {n}", fix=_RECONVERT)
        for entry in header["shards"]:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and SHARD_NAME.fullmatch(entry["name"]) and type(entry.get("bytes")) is int
                    and entry["bytes"] >= 0):
                raise data_error(index, "invalid shard entry in the header", found=repr(entry)[:120],
                                 expected='{"name": "shard-NNNNN.tar", "bytes": N}: shards live in the dataset '
                                 "directory itself", fix=_RECONVERT)
        return header

    @staticmethod
    def _carried(index: Path, header: dict) -> list[Conditions]:
        """The header's condition sets, each with its width (encoder_width / text_width), and token_id_max."""
        try:
            carried = [Conditions(c) for c in header["conditions"]]
            ok = bool(carried) and all((c in carried) == (type(header[k]) is int) for c, k in (
                (Conditions.encoder_outputs, "encoder_width"), (Conditions.encoder_inputs, "text_width")))
            ok = ok and (header["token_id_max"] is None or type(header["token_id_max"]) is int)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise data_error(index, "line 1 has no valid condition sets",
                             found=repr({k: header.get(k) for k in ("conditions", "encoder_width", "text_width")}),
                             expected='"conditions": a non-empty list of encoder_outputs / encoder_inputs, an int '
                             '"encoder_width" exactly with encoder_outputs and "text_width" exactly with '
                             'encoder_inputs, "token_id_max": an int or null', fix=_RECONVERT)
        return carried

    def _check_model(self, index: Path, header: dict) -> None:
        """The sets this source hands out are carried, with the model's widths and token ids in its vocabulary."""
        for wanted in self.sets:
            if wanted not in self.carried:
                raise missing_set_error(self.root, wanted, self.carried)
        if Conditions.encoder_outputs in self.sets and self.encoder_width is not None:
            if header["encoder_width"] != self.encoder_width:
                raise width_error(index, "H_enc", header["encoder_width"], self.encoder_width)
        if Conditions.encoder_inputs in self.sets and self.text_width is not None:
            if header["text_width"] != self.text_width:
                raise width_error(index, "D_text", header["text_width"], self.text_width)
        top = header["token_id_max"]
        if Conditions.encoder_inputs in self.sets and self.vocab is not None and type(top) is int and top >= self.vocab:
            raise data_error(index, "token ids beyond the model's vocabulary", key="lyric_token_ids",
                             found=f"ids up to {top} (token_id_max)", expected=f"ids < {self.vocab} "
                             "(model.text_vocab_size)", fix="train with the text encoder and tokenizer the data was "
                             "preprocessed with (model.text_vocab_size, model.text_encoder_path), or re-run "
                             "scripts/preprocess.py with this model's.")

    def _read_entries(self, index: Path, lines: list[bytes], sizes: list[int]) -> None:
        shard_ids = {name: k for k, name in enumerate(self.shards)}
        self._names, self.lengths, self.cond_lengths, self._recs = [], [], [], []
        self.nbytes, dtypes = 0, {}
        for lineno, line in enumerate(lines, start=2):
            try:
                e = json.loads(line)
                shard, off, length = shard_ids[e["shard"]], _count(e["offset"]), _count(e["length"])
                json_off, json_len = (_count(x) for x in e["json"])
                if off + length > sizes[shard] or json_off + json_len > sizes[shard]:
                    raise ValueError("a member lies beyond the end of its shard")
                keys = sample_keys(self.sets, [k for k in OPTIONAL_INPUT_KEYS if k in e["tensors"]])
                fields, shapes = [], {}
                for field in keys:  # only the sets handed out: the others are never mapped
                    dtype_name, shape, t_off, nbytes = e["tensors"][field]
                    dtype = dtypes.get(dtype_name) or dtypes.setdefault(dtype_name, _dtype(dtype_name))
                    if not dtype_fits(SPEC[field][1], dtype):
                        raise ValueError(f"tensor {field} has dtype {dtype_name}, expected "
                                         f"{KIND_DTYPES[SPEC[field][1]]}")
                    shape, t_off, nbytes = tuple(_count(d) for d in shape), _count(t_off), _count(nbytes)
                    numel = math.prod(shape)
                    if nbytes != numel * dtype.itemsize or not off <= t_off <= t_off + nbytes <= off + length:
                        raise ValueError(f"tensor {field} lies outside its member or has a wrong size")
                    fields.append((field, dtype, shape, t_off, numel))
                    shapes[field] = shape
                    self.nbytes += nbytes
                named = _entry_sizes(shapes, keys, self.encoder_width, self.text_width)
                if e["T"] != named["T"] or ("L" in named and e["L"] != named["L"]):
                    raise ValueError(f"T/L {e['T']}/{e['L']} disagree with the tensor shapes "
                                     f"({named['T']}/{named.get('L')})")
                self._recs.append((shard, off, length, int(e["checksum"], 16), tuple(fields), (json_off, json_len)))
                self._names.append(str(e["name"]))
                self.lengths.append(named["T"])
                self.cond_lengths.append(condition_length(named, self.sets[0]))
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise data_error(index, f"line {lineno} is not a valid sample entry", found=f"{exc!r}",
                                 fix=_RECONVERT) from exc

    # -- handles: one mmap (or fd) per shard, opened lazily, reopened in a forked or unpickled process ----------
    def _reset(self) -> None:
        self._pid = os.getpid()
        self._hash = CHECKSUMS.get(self.checksum_name)
        self._maps: list[Optional[mmap.mmap]] = [None] * len(self.shards)
        self._fds: list[Optional[int]] = [None] * len(self.shards)

    def _truncated(self, i: int, shard: int, size: int, end: int) -> DataError:
        return data_error(self.root / self.shards[shard], f"sample '{self._names[i]}': shard truncated while the "
                          "dataset was open", found=f"{size} bytes", expected=f"at least {end} bytes (index.jsonl)",
                          fix="restore the shard (and leave shards unchanged while a run reads them), or " + _RECONVERT)

    def _buffer(self, i: int, shard: int, off: int, length: int) -> tuple[object, int]:
        """(buffer, its file offset) holding bytes [off, off + length) of sample i's shard: the whole shard's mmap,
        or a fresh bytearray read with pread. DataError when the shard no longer holds them: `__init__` checked the
        sizes, but a shard truncated since then would make a mapped read die with SIGBUS (touching a mapped page
        past the file's end) instead of raising."""
        if self._pid != os.getpid():
            self._reset()
        end = off + length
        if self.use_mmap:
            m = self._maps[shard]
            if m is None:
                with open(self.root / self.shards[shard], "rb") as f:
                    size = os.fstat(f.fileno()).st_size  # mmap maps this size; an empty file cannot be mapped
                    if size < end:
                        raise self._truncated(i, shard, size, end)
                    # ACCESS_COPY: writable views, file untouched.
                    m = self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            # len(m): bytes mapped (the file's size when mapped); m.size(): the file's size now, one fstat on the
            # fd the mmap keeps open itself (so no second fd per shard). Checked on every read, as it is the last
            # chance to raise; a shard cut in the microseconds between this check and the read can still SIGBUS.
            if len(m) < end or m.size() < end:
                raise self._truncated(i, shard, min(len(m), m.size()), end)
            if _WILLNEED is not None:  # POSIX; Windows maps without it
                # Ask for the whole member at once: page faults alone read a cold file in small readahead steps.
                start = off - off % mmap.PAGESIZE
                m.madvise(_WILLNEED, start, end - start)
            return m, 0
        fd = self._fds[shard]
        if fd is None:
            fd = self._fds[shard] = os.open(self.root / self.shards[shard], os.O_RDONLY)
        buf = bytearray(length)
        if os.preadv(fd, [buf], off) != length:
            raise self._truncated(i, shard, os.fstat(fd).st_size, end)
        return buf, off

    def __getitem__(self, i: int) -> Sample:
        n, i = len(self._recs), operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples in {self.root}")
        i %= n  # one index per sample for first_read
        shard, off, length, checksum, fields, _ = self._recs[i]
        buf, base = self._buffer(i, shard, off, length)
        if self.verify_checksums and i not in self._verified:
            with memoryview(buf) as view:
                ok = self._hash(view[off - base: off - base + length]) == checksum
            if not ok:
                raise data_error(self.root / self.shards[shard], f"sample '{self._names[i]}' is corrupted",
                                 found=f"a {self.checksum_name} checksum that differs from index.jsonl",
                                 fix="restore the shard from a backup, or " + _RECONVERT)
            if self.verify_once:
                self._verified.add(i)
        tensors = {f: torch.frombuffer(buf, dtype=dt, count=numel, offset=o - base).view(shape)
                   for f, dt, shape, o, numel in fields}
        ids = {f: t.long() for f, t in tensors.items() if SPEC[f][1] == IDS}  # int32 ids: an int64 copy
        if ids:
            check_values(ids, f"{self.location(i)}: sample '{self._names[i]}'", self.vocab)
            tensors.update(ids)
        return sample_from(self._names[i], tensors)

    def metadata(self, i: int) -> dict:
        """The sample's metadata dict (caption, lyrics, ...), from its json member."""
        shard, *_, (off, length) = self._recs[i]
        buf, base = self._buffer(i, shard, off, length)
        return json.loads(bytes(memoryview(buf)[off - base: off - base + length]))["metadata"]

    def __len__(self) -> int:
        return len(self._recs)

    @property
    def keys(self) -> list[str]:
        return list(self._names)

    def shard_of(self, i: int) -> str:
        """File name of the shard holding sample i."""
        return self.shards[self._recs[i][0]]

    def location(self, i: int) -> str:
        """Where sample i lives, for messages: the shard path and the member's byte offset."""
        return f"{self.root / self.shard_of(i)} @ byte {self._recs[i][1]}"

    def close(self) -> None:
        """Drop the shard handles (mmaps are unmapped when the last tensor viewing them is gone)."""
        for fd in self._fds:
            if fd is not None and self._pid == os.getpid():
                os.close(fd)
        self._reset()

    def __del__(self) -> None:
        if "_fds" in self.__dict__:  # not when __init__ raised
            self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_maps"], state["_fds"], state["_pid"], state["_hash"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def __repr__(self) -> str:
        return (f"V3Directory({str(self.root)!r}, {len(self)} samples in {len(self.shards)} shards, "
                f"{self.nbytes / 2**30:.2f} GiB of {' + '.join(self.sets)})")
