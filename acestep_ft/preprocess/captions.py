"""Captions, lyrics and metas per audio file, the caption prompt the text encoder reads and the lyric text the
tokenizer reads (chain steps 3 and 4).

Sources (`PreprocessConfig.metadata_csv`):
- a CSV with a `file` column (path relative to input_dir) and caption, lyrics, bpm, keyscale, timesignature, language
  columns (header names case-insensitive; empty cells = not given);
- else sidecars beside `song.wav`: `song.json` ({"caption", "lyrics", "bpm", "keyscale", "timesignature",
  "language"}), or `song.txt` (the caption) + optional `song.lyrics.txt`.
A file without a (non-empty) caption is skipped and reported. No lyrics = "[Instrumental]" (official); no language =
"unknown" (the official AudioSample default).

    prompt = caption_prompt(Song(...), duration_s=187.4)              # the official SFT_GEN_PROMPT, byte for byte
    text = lyric_text(Song(...), LyricFormat.official_template)        # "# Languages\nen\n\n# Lyric\n...<|endoftext|>"
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from acestep_ft.config import LyricFormat
from acestep_ft.errors import ConfigError, UserError

SFT_GEN_PROMPT = "# Instruction\n{}\n\n# Caption\n{}\n\n# Metas\n{}<|endoftext|>\n"
"""Official `acestep/constants.py` SFT_GEN_PROMPT (instruction, caption, metas)."""
DEFAULT_DIT_INSTRUCTION = "Fill the audio semantic mask based on the given conditions:"
LYRIC_GEN_PROMPT = "# Languages\n{}\n\n# Lyric\n{}<|endoftext|>"
"""Official `acestep/constants.py` LYRIC_GEN_PROMPT (vocal language, lyrics): the lyric text of inference and, since
the official preprocessing switched to it, of official training (`preprocess_lyrics.encode_lyrics`)."""
INSTRUMENTAL = "[Instrumental]"
UNKNOWN_LANGUAGE = "unknown"
"""The official AudioSample.language default, used when a song gives none."""
FIELDS = ("caption", "lyrics", "bpm", "keyscale", "timesignature", "language")


@dataclass(frozen=True)
class Song:
    """What a song's text condition is made of; None = not given."""

    caption: str
    lyrics: Optional[str] = None
    bpm: Optional[int] = None
    keyscale: Optional[str] = None
    timesignature: Optional[str] = None
    language: Optional[str] = None
    """Vocal language code (en, zh, ja, ...) for the official lyric template's "# Languages" header."""

    def as_dict(self) -> dict:
        return asdict(self)


def metas_text(song: Song, duration_s: float) -> str:
    """Official `build_metas_str`: missing values print as N/A; duration in whole seconds of the source file."""
    return (f"- bpm: {song.bpm if song.bpm else 'N/A'}\n"
            f"- timesignature: {song.timesignature if song.timesignature else 'N/A'}\n"
            f"- keyscale: {song.keyscale if song.keyscale else 'N/A'}\n"
            f"- duration: {int(duration_s)} seconds\n")


def caption_prompt(song: Song, duration_s: float) -> str:
    """The text-encoder input of the official preprocessor for this song."""
    return SFT_GEN_PROMPT.format(DEFAULT_DIT_INSTRUCTION, song.caption, metas_text(song, duration_s))


def lyrics_text(song: Song) -> str:
    """The song's lyrics as given, or "[Instrumental]" (what the metadata records)."""
    return song.lyrics if song.lyrics and song.lyrics.strip() else INSTRUMENTAL


def language_of(song: Song) -> str:
    """The song's vocal language, or "unknown" (official default)."""
    return song.language or UNKNOWN_LANGUAGE


def lyric_text(song: Song, lyric_format: LyricFormat) -> str:
    """The text the tokenizer reads for the lyric branch.

    raw: the lyrics as they are (the official trainer's preprocessing until it adopted the template);
    official_template: LYRIC_GEN_PROMPT with the song's language (official inference, and official training now).
    """
    match lyric_format:
        case LyricFormat.raw:
            return lyrics_text(song)
        case LyricFormat.official_template:
            return LYRIC_GEN_PROMPT.format(language_of(song), lyrics_text(song))
    raise ValueError(f"unknown lyric format {lyric_format!r}")


def lyric_padding(lyric_format: LyricFormat) -> str:
    """Tokenizer padding of the lyric ids: raw pads to lyric_max_tokens (the former official preprocessing);
    official_template does not pad (padding="longest" of one text, as official training and inference)."""
    return "max_length" if lyric_format == LyricFormat.raw else "longest"


def _clean(value: Any) -> Optional[str]:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _bpm(value: Any, where: str) -> Optional[int]:
    text = _clean(value)
    if text is None:
        return None
    try:
        return int(float(text))  # official CSV reader: "120.5" -> 120
    except ValueError:
        raise ValueError(f"{where}: bpm {text!r} is not a number") from None


def make_song(record: dict, where: str) -> Song:
    """A Song from a dict of the FIELDS (extra keys ignored); ValueError naming `where` when the caption is missing."""
    caption = _clean(record.get("caption"))
    if caption is None:
        raise ValueError(f"no caption ({where})")
    return Song(caption=caption, lyrics=_clean(record.get("lyrics")), bpm=_bpm(record.get("bpm"), where),
                keyscale=_clean(record.get("keyscale")), timesignature=_clean(record.get("timesignature")),
                language=_clean(record.get("language")))


def read_csv(path: Path) -> dict[str, dict]:
    """{relative file path: row dict with lower-case FIELDS} from a metadata CSV."""
    if not path.is_file():
        raise ConfigError(f"preprocess.metadata_csv={path} is not a file. Fix: the CSV's path, or unset it to read "
                          "sidecar captions.")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = {name.strip().lower(): name for name in reader.fieldnames or []}
        if "file" not in header:
            raise UserError(f"{path}: no `file` column (found {sorted(header)}). Fix: add a `file` column with "
                            "each audio path relative to preprocess.input_dir.")
        rows = {}
        for row in reader:
            rel = Path((row.get(header["file"]) or "").strip()).as_posix()
            if rel and rel != ".":
                rows[rel] = {k: row.get(header[k]) for k in FIELDS if k in header}
        return rows


def sidecar_record(audio: Path) -> tuple[dict, str]:
    """(record, where it came from) from song.json, or song.txt + song.lyrics.txt; ({}, hint) when none exists."""
    stem = audio.with_suffix("")
    as_json, as_txt, lyrics = (stem.with_name(stem.name + s) for s in (".json", ".txt", ".lyrics.txt"))
    if as_json.is_file():
        try:
            record = json.loads(as_json.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{as_json.name} is not valid JSON: {exc}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{as_json.name} is not a JSON object")
        return record, as_json.name
    if as_txt.is_file():
        record = {"caption": as_txt.read_text(encoding="utf-8")}
        if lyrics.is_file():
            record["lyrics"] = lyrics.read_text(encoding="utf-8")
        return record, as_txt.name
    return {}, f"add {as_json.name} or {as_txt.name}"


def load_songs(input_dir: Path, rels: list[str], metadata_csv: Optional[str]) -> tuple[dict, dict, list[str]]:
    """({rel: Song}, {rel: problem}, CSV rows naming no audio file) for the discovered audio files."""
    songs, problems = {}, {}
    rows = read_csv(Path(metadata_csv).expanduser()) if metadata_csv else None
    for rel in rels:
        try:
            if rows is not None:
                songs[rel] = make_song(rows.get(rel, {}), f"no caption in {Path(metadata_csv).name}"
                                       if rel in rows else f"no row in {Path(metadata_csv).name}")
            else:
                record, where = sidecar_record(input_dir / rel)
                songs[rel] = make_song(record, where)
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            problems[rel] = str(exc)
    orphans = sorted(set(rows or {}) - set(rels))
    return songs, problems, orphans
