"""Audio reading: discovery, stereo at the VAE rate, truncation, and the skip reasons."""

import numpy as np
import pytest
import soundfile as sf

from acestep_ft.preprocess.audio import AudioProblem, discover, read_audio


def test_discover_is_recursive_sorted_and_skips_hidden_and_other_files(tmp_path):
    for rel in ["b.wav", "a/c.FLAC", "a/d.mp3", ".hidden/e.wav", "notes.txt", "f.ogg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert discover(tmp_path) == ["a/c.FLAC", "a/d.mp3", "b.wav", "f.ogg"]


def test_mono_is_duplicated_extra_channels_dropped_resampled_and_truncated(tmp_path):
    rng = np.random.default_rng(0)
    mono = rng.uniform(-0.5, 0.5, (44100 * 3, 1)).astype(np.float32)
    sf.write(tmp_path / "m.wav", mono, 44100)
    clip = read_audio(tmp_path / "m.wav", 48000, max_seconds=2.5)
    assert clip.samples.shape == (2, 120000) and clip.samples.dtype.is_floating_point
    assert bool((clip.samples[0] == clip.samples[1]).all()) and clip.source_seconds == pytest.approx(3.0)
    quad = rng.uniform(-0.5, 0.5, (24000, 4)).astype(np.float32)
    sf.write(tmp_path / "q.wav", quad, 24000, subtype="FLOAT")
    clip = read_audio(tmp_path / "q.wav", 24000, max_seconds=10)
    assert clip.samples.shape == (2, 24000) and np.allclose(clip.samples.numpy(), quad[:, :2].T)
    sf.write(tmp_path / "s.ogg", quad[:, :2], 24000)
    assert read_audio(tmp_path / "s.ogg", 48000, 10).samples.shape == (2, 48000)


def test_unreadable_empty_and_short_files_are_problems_with_a_reason(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    with pytest.raises(AudioProblem, match="unreadable"):
        read_audio(tmp_path / "bad.wav", 48000, 10)
    sf.write(tmp_path / "empty.wav", np.zeros((0, 2), np.float32), 48000)
    with pytest.raises(AudioProblem, match="empty|unreadable"):
        read_audio(tmp_path / "empty.wav", 48000, 10)
    sf.write(tmp_path / "short.wav", np.zeros((4800, 1), np.float32), 48000)
    with pytest.raises(AudioProblem, match=r"too short \(0.10 s < 1 s\)"):
        read_audio(tmp_path / "short.wav", 48000, 10)
