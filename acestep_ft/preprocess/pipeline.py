"""The resumable driver: audio folder -> per-song results in output_dir/.work -> v3 shards + index + fingerprint.

    summary = preprocess(cfg.preprocess, cfg.model, cfg.hardware)    # scripts/preprocess.py wraps this

Resume: each finished song is committed in `.work/songs/` as `<id>.safetensors` then `<id>.json` (both written
atomically; the json is the commit mark) with a signature of its source (relative path, file size and mtime, caption
record). `.work/work.json` holds the fingerprint (weights digests + settings) the work was started with; a re-run with
the same fingerprint encodes only the songs without a committed result (or whose source changed), a re-run with
another fingerprint is refused with the fix. At the end all committed songs of the current input are packed with
`write_v3` into `.work/pack`, its shards and fingerprint are moved into output_dir and `index.jsonl` last, so an
interruption at any point never leaves a readable half dataset; then `.work` is removed.

Skips: unreadable / corrupt / empty / non-finite / shorter than 1 s audio, a missing caption, and a song whose
encoding raised an error are reported by file name with the reason; the run goes on. `Summary.ok` is False (the
script exits 1) only when no song at all made it into the dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import safetensors.torch
from tqdm import tqdm

from acestep_ft.atomic import atomic_write_bytes, fsync_path
from acestep_ft.config import HardwareConfig, PreprocessConfig
from acestep_ft.data.fingerprint import FINGERPRINT_NAME, compare_fingerprints
from acestep_ft.data.v3_reader import INDEX_NAME
from acestep_ft.errors import ConfigError, UserError

from .audio import AudioProblem, discover, read_audio
from .captions import INSTRUMENTAL, Song, language_of, load_songs, lyric_padding, lyrics_text
from .encoders import Encoders

WORK_DIR = ".work"
_OUTPUT_OK = re.compile(r"^(shard-\d{5}\.tar(\.tmp)?|fingerprint\.json|\.work|\..*\.tmp)$")


@dataclass
class Summary:
    output_dir: Path
    encoded: list[str] = field(default_factory=list)      # songs encoded by this run
    resumed: list[str] = field(default_factory=list)      # songs taken from .work (an earlier, interrupted run)
    skipped: dict[str, str] = field(default_factory=dict)  # file -> reason
    audio_seconds: float = 0.0                            # of the songs in the dataset (after truncation)
    seconds: float = 0.0
    num_shards: int = 0
    file_bytes: int = 0

    @property
    def num_samples(self) -> int:
        return len(self.encoded) + len(self.resumed)

    @property
    def ok(self) -> bool:
        return self.num_samples > 0

    def text(self) -> str:
        lines = [f"preprocess: {self.num_samples} songs in the dataset ({len(self.encoded)} encoded now, "
                 f"{len(self.resumed)} from an earlier run), {len(self.skipped)} skipped; "
                 f"{self.audio_seconds:.1f} s of audio in {self.seconds:.1f} s"]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped.items()]
        if self.ok:
            lines.append(f"dataset: {self.output_dir} ({self.num_shards} shards, {self.file_bytes / 2**20:.1f} MB)")
        else:
            lines.append("no dataset written: no song could be processed (see the reasons above).")
        return "\n".join(lines)


def settings_of(pre: PreprocessConfig) -> dict:
    """The preprocessing settings that change the stored tensors (the fingerprint's `settings`)."""
    return {"max_seconds": pre.max_seconds, "chunk_seconds": pre.chunk_seconds,
            "overlap_seconds": pre.overlap_seconds, "text_max_tokens": pre.text_max_tokens,
            "lyric_max_tokens": pre.lyric_max_tokens, "dtype": str(pre.dtype), "seed": pre.seed,
            "latents": "latent_dist.sample", "prompt": "SFT_GEN_PROMPT", "store": str(pre.store),
            "lyric_format": str(pre.lyric_format), "lyric_padding": lyric_padding(pre.lyric_format)}


def check_output_dir(out: Path) -> None:
    """Refuse a finished dataset or foreign files before any work (write_v3 would refuse at the very end)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"preprocess.output_dir={out} is a file. Fix: choose a directory.")
    names = sorted(p.name for p in out.iterdir())
    if INDEX_NAME in names:
        raise UserError(f"{out} already holds a finished dataset ({INDEX_NAME}). Fix: choose another "
                        "preprocess.output_dir, or delete it to build it again.")
    foreign = [n for n in names if not _OUTPUT_OK.match(n)]
    if foreign:
        raise UserError(f"{out} holds files that are not part of a dataset being built: {', '.join(foreign[:10])}. "
                        "Fix: choose an empty or new preprocess.output_dir.")


def open_work(work: Path, fingerprint: dict) -> None:
    """Create `.work`, or check that an existing one was started with this fingerprint."""
    manifest = work / "work.json"
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))["fingerprint"]
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{manifest} is damaged ({exc!r}). Fix: delete {work} to start over.") from exc
        if old != fingerprint:
            diffs = compare_fingerprints(old, fingerprint) or [
                f"{k}: {old.get(k)!r} then, {fingerprint.get(k)!r} now" for k in sorted(set(old) | set(fingerprint))
                if old.get(k) != fingerprint.get(k)]
            done = len(list((work / "songs").glob("*.json")))
            raise UserError(f"{work} holds an unfinished run ({done} songs done) made with other weights or "
                            "settings:\n  " + "\n  ".join(d.replace("training has", "this run has") for d in diffs)
                            + f"\nFix: re-run with the settings it was started with to finish it, or delete {work} "
                            "to start over.")
        return
    (work / "songs").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(manifest, json.dumps({"fingerprint": fingerprint}, indent=2, sort_keys=True).encode())


def song_id(rel: str) -> str:
    return hashlib.sha1(rel.encode()).hexdigest()[:20]


def signature(path: Path, rel: str, song: Song) -> str:
    """Changes when the file or its caption record changes: a committed result is then encoded again."""
    st = path.stat()
    return hashlib.sha1(json.dumps([rel, st.st_size, st.st_mtime_ns, song.as_dict()]).encode()).hexdigest()


def committed(work: Path, rel: str, sig: str) -> Optional[dict]:
    """The committed record of `rel` if its signature matches, else None."""
    path = work / "songs" / f"{song_id(rel)}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    ok = record.get("signature") == sig and (work / "songs" / f"{song_id(rel)}.safetensors").is_file()
    return record if ok else None


def commit(work: Path, rel: str, sig: str, tensors: dict, metadata: dict, seconds: float) -> None:
    base = work / "songs" / song_id(rel)
    atomic_write_bytes(base.with_suffix(".safetensors"), safetensors.torch.save(tensors))
    record = {"key": rel, "signature": sig, "seconds": seconds, "metadata": metadata}
    atomic_write_bytes(base.with_suffix(".json"), json.dumps(record, ensure_ascii=False).encode())


def song_metadata(rel: str, song: Song, source_seconds: float, seconds: float) -> dict:
    """The official .pt `metadata` fields (audio_path relative to input_dir; lyrics as given, not the template)."""
    return {"audio_path": rel, "filename": Path(rel).name, "caption": song.caption, "lyrics": lyrics_text(song),
            "duration": int(source_seconds), "seconds_encoded": round(seconds, 3), "bpm": song.bpm,
            "keyscale": song.keyscale, "timesignature": song.timesignature, "language": language_of(song),
            "is_instrumental": lyrics_text(song) == INSTRUMENTAL}


def publish(pack: Path, out: Path) -> None:
    """Move the packed shards and fingerprint into `out`, index.jsonl last: `out` is readable only when complete."""
    for stale in out.iterdir():
        if stale.name.startswith("shard-") or stale.name == FINGERPRINT_NAME:
            stale.unlink()
    names = sorted(p.name for p in pack.iterdir() if p.name != INDEX_NAME)
    for name in names + [INDEX_NAME]:
        os.replace(pack / name, out / name)
    fsync_path(out)


def preprocess(pre: PreprocessConfig, model_cfg: Any, hw: HardwareConfig, progress: bool = True,
               load: Callable[..., Encoders] = Encoders.load) -> Summary:
    """Run the whole chain; returns the Summary (its `ok` is False when nothing could be processed)."""
    from acestep_ft.data.v3_writer import write_v3

    start = time.perf_counter()
    input_dir, out = Path(pre.input_dir).expanduser(), Path(pre.output_dir).expanduser()
    if not input_dir.is_dir():
        raise ConfigError(f"preprocess.input_dir={input_dir} is not a directory. Fix: the folder of your audio files.")
    check_output_dir(out)
    rels = discover(input_dir)
    if not rels:
        raise ConfigError(f"no audio files (wav, flac, mp3, ogg, opus) under preprocess.input_dir={input_dir}. Fix: "
                          "the folder of your audio files.")
    songs, problems, orphans = load_songs(input_dir, rels, pre.metadata_csv)
    for rel in orphans:
        print(f"warning: {pre.metadata_csv} names {rel}, which is not an audio file under {input_dir}")
    enc = load(model_cfg, pre, hw)
    fingerprint = enc.fingerprint(settings_of(pre))
    work = out / WORK_DIR
    out.mkdir(parents=True, exist_ok=True)
    open_work(work, fingerprint)
    summary = Summary(out, skipped=dict(problems))
    kept: list[str] = []
    bar = tqdm([r for r in rels if r in songs], desc="preprocess", unit="song", disable=not progress)
    for rel in bar:
        bar.set_postfix_str(rel[-40:], refresh=False)
        song, path = songs[rel], input_dir / rel
        try:
            sig = signature(path, rel, song)
        except OSError as exc:
            summary.skipped[rel] = f"unreadable ({exc.strerror})"
            continue
        record = committed(work, rel, sig)
        if record is not None:
            summary.resumed.append(rel)
        else:
            try:
                clip = read_audio(path, enc.sample_rate, pre.max_seconds)
                tensors = enc.encode(clip, song, rel)
            except AudioProblem as exc:
                summary.skipped[rel] = str(exc)
                continue
            except Exception as exc:  # one bad song (e.g. out of memory on a long file) must not end the run
                summary.skipped[rel] = f"encoding failed ({type(exc).__name__}: {exc})"
                continue
            record = {"seconds": clip.seconds}
            commit(work, rel, sig, tensors, song_metadata(rel, song, clip.source_seconds, clip.seconds), clip.seconds)
            summary.encoded.append(rel)
        summary.audio_seconds += record["seconds"]
        kept.append(rel)
    bar.close()
    summary.skipped = {r: summary.skipped[r] for r in rels if r in summary.skipped}  # in file order
    if kept:
        pack = work / "pack"
        shutil.rmtree(pack, ignore_errors=True)
        written = write_v3(_items(work, kept), pack, int(pre.shard_mb * 2**20), fingerprint=fingerprint,
                           progress=progress)
        publish(pack, out)
        shutil.rmtree(work)
        summary.num_shards, summary.file_bytes = written.num_shards, written.file_bytes
    elif not any((work / "songs").iterdir()):  # nothing to resume: leave no trace that would pin the settings
        shutil.rmtree(work)
        if not any(out.iterdir()):
            out.rmdir()
    summary.seconds = time.perf_counter() - start
    return summary


def _items(work: Path, rels: list[str]) -> Iterator[tuple[str, dict, dict]]:
    for rel in rels:
        base = work / "songs" / song_id(rel)
        record = json.loads(base.with_suffix(".json").read_text(encoding="utf-8"))
        yield rel, safetensors.torch.load(base.with_suffix(".safetensors").read_bytes()), record["metadata"]
