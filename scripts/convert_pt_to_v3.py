"""Convert an official ACE-Step / Side-Step `.pt` dataset directory into a v3 packed dataset, losslessly.

    python scripts/convert_pt_to_v3.py --src DIR --dst DIR [--shard-mb 256] [--overwrite] [--model-variant X]

Files are found as training finds them (`pt_index`: manifest.json order, else the sorted *.pt files), loaded with
`torch.load(weights_only=True)` and written in their original dtype (bf16 stays bf16), with every condition set they
carry (official files: encoder_outputs; files that also hold the condition encoder's inputs keep them too). Afterwards
every sample is read back through `V3Directory` (checksums on), once per condition set, and compared with the source:
tensors byte-identical (dtype, shape and a hash of the bytes recorded while converting; token ids compared as
int64), metadata equal as JSON. The fingerprint records --model-variant
(default "unknown"); encoder digests are unknown for .pt data. Exit status: 0 converted and verified; 1 a file could not
be read or written, or the round trip differs (the message names the file and the fix); 2 usage: --src is no .pt
dataset directory, --dst is a file, a bad option.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import xxhash

from acestep_ft.data.batch import ID_KEYS, ConditionWidths
from acestep_ft.data.errors import DataError, data_error
from acestep_ft.data.fingerprint import make_fingerprint
from acestep_ft.data.pt_format import SPEC, load_pt
from acestep_ft.data.pt_index import MANIFEST, index_directory
from acestep_ft.data.v3_reader import INDEX_NAME, V3Directory
from acestep_ft.data.v3_writer import V3WriteSummary, json_safe, write_v3
from acestep_ft.errors import ConfigError, UserError, reported_errors


def tensor_identity(tensors) -> dict:
    """Per sample tensor (the keys of the .pt format that are present and not None): (dtype, shape, xxh3 of the raw
    bytes); equal dicts <=> bit-identical tensors. Token ids are taken as int64 (v3 hands them out so)."""
    out = {}
    for k in SPEC:
        t = tensors.get(k)
        if isinstance(t, torch.Tensor):
            t = (t.long() if k in ID_KEYS else t).detach().contiguous()
            out[k] = (str(t.dtype), tuple(t.shape), xxhash.xxh3_64_hexdigest(t.view(-1).view(torch.uint8).numpy()))
    return out


def _read_back(dst: Path) -> list[V3Directory]:
    """One checksummed reader per condition set the written dataset carries, with the header's widths."""
    header = json.loads((dst / INDEX_NAME).read_bytes().splitlines()[0])
    widths = ConditionWidths(encoder=header["encoder_width"] or 0, text=header["text_width"] or 0,
                             vocab=(header["token_id_max"] or 0) + 1)
    return [V3Directory(dst, widths, verify_checksums=True, conditions=c) for c in header["conditions"]]


def convert(src: Path, dst: Path, shard_mb: float, overwrite: bool, model_variant: str,
            progress: bool = True) -> V3WriteSummary:
    """Write `src` as v3 into `dst` and verify the round trip; raises DataError on any problem."""
    index = index_directory(src)
    expected: list[tuple[str, dict, str]] = []
    current: list[Path] = []

    def samples():
        for key, path in zip(index.keys, index.paths):
            current[:] = [path]
            obj = load_pt(path)
            meta = obj.get("metadata") if isinstance(obj, dict) else None
            yield key, obj, meta  # the writer validates (keys, shapes, finite) before this resumes
            expected.append((key, tensor_identity(obj), json.dumps(json_safe(meta or {}), sort_keys=True)))

    fingerprint = make_fingerprint(model_variant, None, None, None, None,
                                   {"source": "pt", "source_layout": index.layout, "source_dir": str(src)})
    try:
        summary = write_v3(samples(), dst, int(shard_mb * 2**20), fingerprint=fingerprint, progress=progress,
                           overwrite=overwrite)
    except DataError as exc:
        if current and str(current[0]) not in str(exc):
            raise DataError(f"{exc} (source file: {current[0]})") from exc
        raise
    for v3 in _read_back(dst):
        _verify(v3, dst, expected)
    return summary


def _verify(v3: V3Directory, dst: Path, expected: list[tuple[str, dict, str]]) -> None:
    """Every sample of `v3` (one condition set) equals its source: tensors of that set bit-identical, metadata."""
    if len(v3) != len(expected):
        raise data_error(dst, "round trip: sample count differs", found=str(len(v3)), expected=str(len(expected)),
                         fix="re-run the conversion.")
    for i, (key, identity, meta) in enumerate(expected):  # the source hashes were taken as each file was written
        sample = v3[i]
        got = tensor_identity(vars(sample))
        if sample.key != key or got != {k: identity.get(k) for k in got}:
            raise data_error(dst, "round trip: tensors differ from the source", key=key, found=str(got),
                             expected=str(identity), fix="re-run the conversion.")
        if json.dumps(v3.metadata(i), sort_keys=True) != meta:
            raise data_error(dst, "round trip: metadata differs from the source", key=key,
                             found=json.dumps(v3.metadata(i)), expected=meta, fix="re-run the conversion.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, type=Path, help="official / Side-Step .pt dataset directory")
    parser.add_argument("--dst", required=True, type=Path, help="output directory for the v3 dataset")
    parser.add_argument("--shard-mb", type=float, default=256, help="target shard size in MiB (default 256)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing v3 dataset in --dst")
    parser.add_argument("--model-variant", default="unknown", help="model variant the data was preprocessed for")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.shard_mb <= 0:
        parser.error(f"--shard-mb {args.shard_mb} must be > 0")
    start = time.perf_counter()
    with reported_errors():  # the message only, no traceback
        src, dst = args.src.expanduser(), args.dst.expanduser()
        if not src.is_dir():
            raise ConfigError(f"--src {src} is not a directory. Fix: give the directory of the official / Side-Step "
                              ".pt files (with or without manifest.json).")
        if not (src / MANIFEST).is_file() and not any(src.glob("*.pt")):
            raise ConfigError(f"--src {src} holds no *.pt files and no {MANIFEST}. Fix: give the output directory of "
                              "the ACE-Step or Side-Step preprocessor.")
        if dst.exists() and not dst.is_dir():
            raise ConfigError(f"--dst {dst} is a file. Fix: give a new or empty directory for the v3 dataset.")
        try:
            s = convert(src, dst, args.shard_mb, args.overwrite, args.model_variant, not args.no_progress)
        except OSError as exc:  # no permission, disk full
            raise UserError(f"{exc.filename or dst}: {exc.strerror or exc}. Fix: check the path, its permissions "
                            "and the free disk space.") from exc
    total = time.perf_counter() - start
    print(f"converted {s.num_samples} samples ({s.file_bytes / 1e9:.3f} GB in {s.num_shards} shards) to {s.path} "
          f"in {s.seconds:.1f} s ({s.mb_per_s:.0f} MB/s); round trip verified bit-identical "
          f"(total {total:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
