"""Caption sources (sidecars, CSV), skip reasons, and the caption prompt in the official format."""

import json

from acestep_ft.config import LyricFormat
from acestep_ft.preprocess.captions import Song, caption_prompt, load_songs, lyric_padding, lyric_text, lyrics_text

OFFICIAL = ("# Instruction\nFill the audio semantic mask based on the given conditions:\n\n# Caption\nlofi piano\n\n"
            "# Metas\n- bpm: 90\n- timesignature: 4\n- keyscale: A minor\n- duration: 187 seconds\n<|endoftext|>\n")


def test_caption_prompt_is_the_official_sft_gen_prompt_byte_for_byte():
    song = Song("lofi piano", bpm=90, keyscale="A minor", timesignature="4")
    assert caption_prompt(song, 187.9) == OFFICIAL
    bare = caption_prompt(Song("x"), 30.0)
    assert bare.endswith("# Metas\n- bpm: N/A\n- timesignature: N/A\n- keyscale: N/A\n- duration: 30 seconds\n"
                         "<|endoftext|>\n")
    assert lyrics_text(Song("x")) == "[Instrumental]" and lyrics_text(Song("x", lyrics="la")) == "la"


def test_lyric_text_raw_or_the_official_template_byte_for_byte():
    sung = Song("x", lyrics="line one\nline {two} {0}", language="pa")
    assert lyric_text(sung, LyricFormat.raw) == "line one\nline {two} {0}"
    assert lyric_text(sung, LyricFormat.official_template) == \
        "# Languages\npa\n\n# Lyric\nline one\nline {two} {0}<|endoftext|>"
    assert lyric_text(Song("x"), LyricFormat.official_template) == \
        "# Languages\nunknown\n\n# Lyric\n[Instrumental]<|endoftext|>"  # official defaults, not special-cased
    assert lyric_padding(LyricFormat.raw) == "max_length" and lyric_padding(LyricFormat.official_template) == "longest"


def test_sidecars_json_txt_and_lyrics_and_the_reasons_for_a_missing_caption(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"caption": " pop ", "bpm": "120.7", "lyrics": "la", "language": "en"}))
    (tmp_path / "b.txt").write_text("piano\n")
    (tmp_path / "b.lyrics.txt").write_text("da di")
    (tmp_path / "c.txt").write_text("   ")
    (tmp_path / "e.json").write_text("{not json")
    songs, problems, _ = load_songs(tmp_path, ["a.wav", "b.flac", "c.wav", "d.mp3", "e.wav"], None)
    assert songs["a.wav"] == Song("pop", lyrics="la", bpm=120, language="en")
    assert songs["b.flac"] == Song("piano", lyrics="da di")
    assert problems == {"c.wav": "no caption (c.txt)", "d.mp3": "no caption (add d.json or d.txt)",
                        "e.wav": problems["e.wav"]}
    assert problems["e.wav"].startswith("e.json is not valid JSON")


def test_csv_rows_by_relative_path_case_insensitive_headers(tmp_path):
    csv = tmp_path / "meta.csv"
    csv.write_text("File,Caption,BPM,keyscale,timesignature,lyrics,Language\nsub/a.wav,rock,100,E minor,3,,ja\n"
                   "b.wav,,90,,,,\nghost.wav,x,,,,,\n")
    songs, problems, orphans = load_songs(tmp_path, ["sub/a.wav", "b.wav", "c.wav"], str(csv))
    assert songs == {"sub/a.wav": Song("rock", bpm=100, keyscale="E minor", timesignature="3", language="ja")}
    assert problems == {"b.wav": "no caption (no caption in meta.csv)", "c.wav": "no caption (no row in meta.csv)"}
    assert orphans == ["ghost.wav"]
