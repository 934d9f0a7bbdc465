"""Dataset QA: check a whole preprocessed dataset (.pt or v3, auto-detected) and report every problem at once.

    python -m acestep_ft.data.validate --dataset-dir DIR [--conditions auto|encoder_outputs|encoder_inputs]
        [--encoder-width 2048] [--text-width 1024] [--vocab-size 151669] [--batch-size 4] [--bucket-seconds 10]
        [--max-frames-per-batch 0] [--max-seconds S] [--min-seconds 1.0] [--model-variant X] [--json]

Every sample is read once, streaming (one in memory at a time): .pt files with `load_pt`, v3 samples through
`V3Directory` with checksums verified. A file or sample that cannot be read is an error and the scan goes on. Each
problem names the file / shard, the sample key, the tensor key, what was found and the fix (checks: `qa_checks`).
Condition sets (see `batch`): --conditions auto (the default) checks every set each sample carries and reports which
sets the dataset carries (all samples / some); --conditions X checks set X, and a sample without it is an error
(what `dataset.conditions=X` would refuse). encoder_inputs samples: D_text is judged by --text-width (default: the v3
header's, or the most common), token ids by --vocab-size (default: only >= 0).
The report: a summary (samples, errors, warnings), the condition sets, the problems grouped by kind (at most
--max-listed each), the fingerprint, length statistics, a length histogram and the padding of the configured
batching vs random batches.
Exit status: 1 when any error is found, 0 otherwise (warnings do not fail), 2 for usage errors (bad options, or a
--dataset-dir that is missing or no dataset directory: the message only, on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional

from tqdm import tqdm

from acestep_ft.config import Conditions, DatasetConfig, HardwareConfig
from acestep_ft.data import pt_index
from acestep_ft.data.errors import DataError
from acestep_ft.data.fingerprint import FINGERPRINT_NAME, compare_fingerprints, read_fingerprint
from acestep_ft.data.pt_format import SPEC, load_pt
from acestep_ft.data.qa_checks import (ERROR, WARNING, WIDTHS, Problem, Tally, check_sample, histogram,
                                       length_stats, padding)
from acestep_ft.data.v3_reader import CHECKSUMS, INDEX_NAME, V3Directory, detect_format
from acestep_ft.errors import ConfigError, reported_errors

MAX_LISTED = 50
_RECONVERT = "restore the shard from a backup, or re-run scripts/convert_pt_to_v3.py (or the preprocessing)."


def _fatal(check: str, where: Any, exc: Exception, fix: str = "") -> Problem:
    """A DataError as a Problem (its message already carries found / expected / fix); where=None: the path the
    message starts with."""
    text = str(exc)
    if where is None:
        where, _, text = text.partition(": ") if ": " in text else ("?", "", text)
    text = text.removeprefix(f"{where}: ")
    message, _, own_fix = text.partition(" Fix: ")
    return Problem(ERROR, check, str(where), message.rstrip("."), own_fix or fix or "see the message.")


# ---------------------------------------------------------------------------------------------------- .pt
def _pt_entries(root: Path, problems: list[Problem]) -> tuple[list[tuple[Path, str]], str]:
    """(file, raw key) per sample, in training order, and the layout; manifest entries that resolve to no file
    are reported one by one instead of stopping the scan."""
    try:
        index = pt_index.index_directory(root)
        return [(p, p.name[:-3] if p.name.endswith(".pt") else p.stem) for p in index.paths], index.layout
    except DataError:
        manifest = root / pt_index.MANIFEST
        if not manifest.is_file():
            raise
        entries = pt_index._read_manifest(manifest)  # a broken manifest raises: nothing to scan
    found = []
    for i, entry in enumerate(entries):
        tried = pt_index._candidates(entry, root)
        hit = next((p for p in tried if p.is_file()), None)
        if hit is None:
            problems.append(Problem(ERROR, "missing_file", str(manifest), f"samples[{i}] = {entry!r} not found "
                                    f"(tried: {', '.join(map(str, tried))})", "copy the file into the dataset "
                                    "directory, correct its path in manifest.json, or remove the entry."))
        else:
            found.append((hit, hit.name[:-3] if hit.name.endswith(".pt") else hit.stem))
    return found, pt_index.MANIFEST


def _scan_pt(root: Path, problems: list[Problem], tally: Tally, info: dict) -> Iterator[tuple[str, str, Any]]:
    entries, info["layout"] = _pt_entries(root, problems)
    info["samples"] = len(entries)
    try:
        info["fingerprint"] = read_fingerprint(root)
    except DataError as exc:
        problems.append(_fatal("fingerprint", root / FINGERPRINT_NAME, exc))
    for path, key in entries:
        tally.keys.append((key, str(path)))
        try:
            obj = load_pt(path)
        except DataError as exc:
            problems.append(replace(_fatal("unreadable", path, exc), sample=key))
            yield str(path), key, None
            continue
        yield str(path), key, obj


# ---------------------------------------------------------------------------------------------------- v3
class _ScanV3(V3Directory):
    """A V3Directory that opens despite truncated / missing shards, a missing fingerprint or bad index lines,
    recording them as problems: the samples that can be read are still read (checksums verified, pread, no mmap),
    with every condition set the header lists, checked against the header's widths."""

    def __init__(self, root: Path, problems: list[Problem]) -> None:  # noqa: super().__init__ would raise
        self.root, self.verify_checksums, self.use_mmap = root, True, False
        self.verify_once, self._verified = False, set()  # validation checks every read
        index = root / INDEX_NAME
        lines = index.read_bytes().splitlines()
        header = self._header(index, lines)
        self.sets, self.vocab = list(self.carried), None  # ids are checked by check_sample (--vocab-size)
        self.encoder_width, self.text_width = header["encoder_width"], header["text_width"]
        self.checksum_name = header["checksum"]
        if self.checksum_name not in CHECKSUMS:
            raise DataError(f"{index}: checksum algorithm {self.checksum_name!r} not available. Fix: pip install "
                            "xxhash.")
        self.shards = [s["name"] for s in header["shards"]]
        sizes = [s["bytes"] for s in header["shards"]]
        for name, size in zip(self.shards, sizes):
            actual = (root / name).stat().st_size if (root / name).is_file() else None
            if actual != size:
                problems.append(Problem(ERROR, "shard_size", str(root / name),
                                        "missing" if actual is None else f"truncated or changed: {actual} bytes, "
                                        f"index.jsonl says {size}", _RECONVERT))
        try:
            self.fingerprint = read_fingerprint(root)
        except DataError as exc:
            problems.append(_fatal("fingerprint", root / FINGERPRINT_NAME, exc))
            self.fingerprint = None
        recs, names, lengths, conds, nbytes = [], [], [], [], 0
        for lineno, line in enumerate(lines[1:], start=2):
            try:
                self._read_entries(index, [line], sizes)
            except DataError as exc:
                problems.append(Problem(ERROR, "index_entry", str(index), f"line {lineno} is not a valid sample "
                                        f"entry ({exc.__cause__!r})", _RECONVERT))
                continue
            recs += self._recs
            names += self._names
            lengths += self.lengths
            conds += self.cond_lengths
            nbytes += self.nbytes
        self._recs, self._names, self.lengths, self.cond_lengths, self.nbytes = recs, names, lengths, conds, nbytes
        self._reset()


def _scan_v3(root: Path, problems: list[Problem], tally: Tally, info: dict) -> Iterator[tuple[str, str, Any]]:
    info["layout"] = "v3 shards"
    src = _ScanV3(root, problems)
    info["samples"], info["fingerprint"] = len(src), src.fingerprint
    info["header_widths"] = {"encoder": src.encoder_width, "text": src.text_width}
    for i, key in enumerate(src.keys):
        where = src.location(i)
        tally.keys.append((key, where))
        try:
            sample = src[i]
        except (DataError, OSError) as exc:
            text = str(exc).partition(" Fix: ")[0].removeprefix(f"{root / src.shard_of(i)}: ").rstrip(".")
            checksum = text.startswith(f"sample '{key}' is corrupted")
            problems.append(Problem(ERROR, "checksum" if checksum else "unreadable", where,
                                    text.removeprefix(f"sample '{key}' "), _RECONVERT, key))
            yield where, key, None
            continue
        yield where, key, {k: getattr(sample, k) for k in SPEC if getattr(sample, k) is not None}
    src.close()


# ---------------------------------------------------------------------------------------------------- scan
def _fingerprint_problems(fp: Optional[dict], root: Path, fmt: str, variant: Optional[str],
                          sets: list[str]) -> list[Problem]:
    where = str(root / FINGERPRINT_NAME)
    if fp is None:
        fix = ("convert with scripts/convert_pt_to_v3.py --model-variant X to record one." if fmt == "pt"
               else "restore fingerprint.json, or re-run scripts/convert_pt_to_v3.py.")
        return [Problem(WARNING, "fingerprint", where, "no fingerprint: training cannot check that the data "
                        "matches the model", fix)]
    if variant is None:
        return []
    diffs = compare_fingerprints(fp, {"model_variant": variant})
    if diffs:
        message, _, fix = diffs[0].partition(" Fix: ")
        return [Problem(ERROR, "fingerprint", where, message, fix)]
    if fp.get("model_variant") in (None, "", "unknown") and sets != [Conditions.encoder_inputs]:
        # encoder_inputs data does not depend on the variant: only data with encoder outputs needs one
        return [Problem(WARNING, "fingerprint", where, f"model_variant unknown, cannot check --model-variant "
                        f"{variant}", "re-run preprocessing / conversion with --model-variant.")]
    return []


_WIDTH_FIX = {
    "encoder": "train a model variant whose encoder_hidden_size is {w}, or re-run preprocessing with the checkpoint "
    "of the variant you train.",
    "text": "train a model whose text_hidden_dim is {w}, or re-run scripts/preprocess.py with the text encoder of the "
    "model you train.",
}


def _width(tally: Tally, header: Optional[int], given: Optional[int], kind: str,
           root: Path) -> tuple[dict, list[Problem]]:
    """({"width", "source"}, problems) for H_enc (kind "encoder") or D_text ("text"): the v3 header's width is
    every sample's; --encoder-width / --text-width, else the header's, else the most common one judges them."""
    option = f"--{kind}-width"
    name, key = WIDTHS[kind]
    if header is not None and given is not None and header != given:
        return {"width": header, "source": "index.jsonl header"}, [Problem(
            ERROR, f"{kind}_width", str(root / INDEX_NAME), f"{name} = {header} for all samples, expected {given} "
            f"({option})", _WIDTH_FIX[kind].format(w=header), key=key)]
    width, problems = tally.width_problems(given if header is None else header, kind)
    source = (option if given is not None else "index.jsonl header" if header is not None
              else "most common in the dataset")
    return {"width": width, "source": source}, problems


def validate(root: str | Path, encoder_width: Optional[int] = None, batch_size: int = HardwareConfig.batch_size,
             bucket_seconds: float = DatasetConfig.bucket_seconds, max_frames_per_batch: int = 0,
             max_seconds: Optional[float] = None, min_seconds: float = 1.0, model_variant: Optional[str] = None,
             max_listed: int = MAX_LISTED, progress: bool = True, *, conditions: Optional[Conditions] = None,
             text_width: Optional[int] = None, vocab_size: Optional[int] = None) -> dict:
    """Scan a dataset directory; returns the report (a JSON-safe dict). Raises DataError only when `root` is not
    a dataset at all (usage error). `conditions` None checks every condition set a sample carries, a set checks
    that one (samples without it are errors)."""
    root = Path(root).expanduser()
    fmt = detect_format(root)
    root = root if root.is_dir() else root.parent
    problems: list[Problem] = []
    tally = Tally()
    info = {"layout": "unknown", "samples": 0, "header_widths": {"encoder": None, "text": None}}
    scan = _scan_v3 if fmt == "v3_sharded" else _scan_pt
    read = 0
    try:
        bar = tqdm(scan(root, problems, tally, info), desc=f"validate {root.name}", unit="sample", file=sys.stderr,
                   disable=None if progress else True, mininterval=1.0)
        for where, key, obj in bar:
            bar.total = info["samples"]
            if obj is None:
                continue
            read += 1
            problems.extend(check_sample(obj, where, key, min_seconds, conditions, vocab_size))
            tally.add(where, key, obj)
            del obj
    except DataError as exc:  # the index / manifest itself cannot be read: nothing (more) to scan
        problems.append(_fatal("index", None, exc))
    except OSError as exc:  # no permission, a directory where a file belongs
        problems.append(Problem(ERROR, "index", str(exc.filename or root), f"cannot be read ({exc.strerror or exc})",
                                "make it a readable file, or restore the dataset."))
    problems += tally.content_dups
    widths = {}
    for kind, given in (("encoder", encoder_width), ("text", text_width)):
        widths[kind], width_problems = _width(tally, info["header_widths"][kind], given, kind, root)
        problems += width_problems
    sets, set_problems = tally.condition_sets(str(root))
    problems += set_problems if conditions is None else [p for p in set_problems if p.check != "conditions"]
    problems += tally.key_problems("manifest.json" if info["layout"] == pt_index.MANIFEST else
                                   "index.jsonl" if fmt == "v3_sharded" else "the directory")
    if "fingerprint" in info:  # not when the index could not be read
        problems += _fingerprint_problems(info["fingerprint"], root, fmt, model_variant, sets["all"])
    info["conditions"] = {**sets, "checked": str(conditions) if conditions is not None else "auto"}
    return _report(root, fmt, info, read, problems, tally, widths, max_listed, dict(
        batch_size=batch_size, bucket_seconds=bucket_seconds, max_frames_per_batch=max_frames_per_batch,
        max_seconds=max_seconds, min_seconds=min_seconds, model_variant=model_variant, vocab_size=vocab_size))


def _report(root: Path, fmt: str, info: dict, read: int, problems: list[Problem], tally: Tally, widths: dict,
            max_listed: int, settings: dict) -> dict:
    groups: dict[tuple[str, str], list[Problem]] = {}
    for p in problems:
        groups.setdefault((p.severity, p.check), []).append(p)
    order = sorted(groups, key=lambda g: (g[0] != ERROR, -len(groups[g]), g[1]))
    errors = sum(p.severity == ERROR for p in problems)
    return {
        "dataset": str(root), "format": fmt, "layout": info["layout"], "samples": info["samples"],
        "samples_read": read, "errors": errors, "warnings": len(problems) - errors, "ok": errors == 0,
        "conditions": info["conditions"],
        "encoder_width": widths["encoder"], "text_width": widths["text"],
        "fingerprint": info.get("fingerprint"),
        "problems": [{"severity": s, "check": c, "count": len(groups[(s, c)]),
                      "items": [p.to_dict() for p in groups[(s, c)][:max_listed]],
                      "more": max(0, len(groups[(s, c)]) - max_listed)} for s, c in order],
        "lengths": length_stats(tally.frames),
        "histogram": histogram(tally.frames, settings["bucket_seconds"]),
        "padding": padding(tally.frames, settings["batch_size"], settings["bucket_seconds"],
                           settings["max_frames_per_batch"], settings["max_seconds"]),
        "settings": settings,
    }


# ---------------------------------------------------------------------------------------------------- output
def render_text(report: dict) -> str:
    r = report
    verdict = "FAILED" if r["errors"] else "OK"
    out = [f"Dataset {r['dataset']} ({r['format']}, {r['layout']})",
           f"Summary: {r['samples']} samples ({r['samples_read']} read), {r['errors']} errors, "
           f"{r['warnings']} warnings -> {verdict}"]
    c = r["conditions"]
    out.append("Condition sets: " + (", ".join(c["all"]) or "none") + " (all samples)"
               + (f"; {', '.join(c['some'])} (some samples)" if c["some"] else "") + f"; checked: {c['checked']}")
    w = r["encoder_width"]
    if w["width"] is not None or Conditions.encoder_outputs in c["all"] + c["some"]:
        out.append(f"Encoder width: {w['width'] or 'unknown'} ({w['source']})")
    w = r["text_width"]
    if w["width"] is not None:
        out.append(f"Text width: {w['width']} ({w['source']})")
    fp = r["fingerprint"]
    out.append("Fingerprint: " + (", ".join(f"{k}={v}" for k, v in sorted(fp.items()) if k != "settings")
                                  if fp else "none"))
    for g in r["problems"]:
        out.append(f"\n{g['severity'].upper()} {g['check']} ({g['count']}):")
        fixes = {item["fix"] for item in g["items"]}
        for item in g["items"]:
            p = Problem(**item)
            out.append("  " + p.line() + ("" if len(fixes) == 1 else f". Fix: {p.fix}"))
        if g["more"]:
            out.append(f"  ... and {g['more']} more")
        if len(fixes) == 1:
            out.append(f"  Fix: {fixes.pop()}")
    ls = r["lengths"]
    out.append("")
    if ls["count"]:
        total = (f"{ls['total_hours']:.2f} h" if ls["total_hours"] >= 1 else f"{60 * ls['total_hours']:.1f} min")
        out.append(f"Lengths: {ls['count']} clips, {total} total; min {ls['min_s']:.1f} s, "
                   f"median {ls['median_s']:.1f} s, max {ls['max_s']:.1f} s")
        h = r["histogram"]
        peak = max(b["count"] for b in h["bins"]) or 1
        out.append(f"Length histogram ({h['bucket_seconds']:g} s buckets):")
        for b in h["bins"]:
            bar = "#" * round(40 * b["count"] / peak)
            out.append(f"  {b['lo_s']:g}-{b['hi_s']:g} s".ljust(16) + f"|{bar:<40}| {b['count']}")
    else:
        out.append("Lengths: no readable samples")
    pad, s = r["padding"], r["settings"]
    if pad:
        crop = f"crop {s['max_seconds']:g} s" if s["max_seconds"] else "no crop"
        bucket = f"bucket {s['bucket_seconds']:g} s" if s["bucket_seconds"] else "no bucketing"
        budget = f"frame budget {s['max_frames_per_batch']}" if s["max_frames_per_batch"] else "no frame budget"
        out.append(f"Padding (batch_size {s['batch_size']}, {bucket}, {budget}, {crop}): "
                   f"{100 * pad['pad_fraction']:.1f}% of frames bucketed vs {100 * pad['naive_pad_fraction']:.1f}% "
                   f"with random pad-to-longest batches; {pad['batches_per_epoch']} batch(es) per epoch, largest "
                   f"batch {pad['max_batch_frames']} frames, {pad['oversize_samples']} clip(s) over the frame budget")
    return "\n".join(out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m acestep_ft.data.validate", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset-dir", required=True, help="preprocessed dataset directory (.pt or v3)")
    p.add_argument("--conditions", default="auto", choices=["auto", *[str(c) for c in Conditions]],
                   help="condition set to check (dataset.conditions); auto = every set each sample carries")
    p.add_argument("--encoder-width", type=int, default=None,
                   help="expected H_enc (default: the v3 header's, or the most common width of the .pt files)")
    p.add_argument("--text-width", type=int, default=None,
                   help="expected D_text of encoder_inputs data (model.text_hidden_dim; default: the v3 header's, "
                   "or the most common)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="token ids must be below it (model.text_vocab_size; default: only >= 0 is checked)")
    p.add_argument("--batch-size", type=int, default=HardwareConfig.batch_size, help="hardware.batch_size")
    p.add_argument("--bucket-seconds", type=float, default=DatasetConfig.bucket_seconds,
                   help="dataset.bucket_seconds (0 = no bucketing)")
    p.add_argument("--max-frames-per-batch", type=int, default=0, help="hardware.max_frames_per_batch (0 = off)")
    p.add_argument("--max-seconds", type=float, default=None, help="dataset.max_seconds crop (default: none)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="warn about clips shorter than this")
    p.add_argument("--model-variant", default=None, help="report a fingerprint whose model_variant differs")
    p.add_argument("--max-listed", type=int, default=MAX_LISTED, help="problems listed per kind")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    bad = [f"{name} must be {rule}" for name, ok, rule in [
        ("--batch-size", args.batch_size >= 1, ">= 1"), ("--bucket-seconds", args.bucket_seconds >= 0, ">= 0"),
        ("--max-frames-per-batch", args.max_frames_per_batch >= 0, ">= 0"),
        ("--encoder-width", args.encoder_width is None or args.encoder_width >= 1, ">= 1"),
        ("--text-width", args.text_width is None or args.text_width >= 1, ">= 1"),
        ("--vocab-size", args.vocab_size is None or args.vocab_size >= 1, ">= 1"),
        ("--max-listed", args.max_listed >= 0, ">= 0")] if not ok]
    if bad:
        parser.error("; ".join(bad))
    with reported_errors():  # the message only, no traceback
        given = Path(args.dataset_dir).expanduser()
        if given.is_file() and given.name not in (INDEX_NAME, pt_index.MANIFEST):
            raise ConfigError(f"--dataset-dir {given} is a file. Fix: give the dataset directory (the one holding "
                              f"{INDEX_NAME} and the shards, or the .pt files / manifest.json).")
        try:
            report = validate(args.dataset_dir, args.encoder_width, args.batch_size, args.bucket_seconds,
                              args.max_frames_per_batch, args.max_seconds, args.min_seconds, args.model_variant,
                              args.max_listed, progress=not args.no_progress,
                              conditions=None if args.conditions == "auto" else Conditions(args.conditions),
                              text_width=args.text_width, vocab_size=args.vocab_size)
        except DataError as exc:  # --dataset-dir is not a dataset directory at all: a usage error
            raise ConfigError(str(exc).replace("dataset.path", "--dataset-dir")) from None
    print(json.dumps(report, indent=2, default=str) if args.json else render_text(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
