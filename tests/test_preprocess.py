"""Preprocessing end to end with tiny random encoders of the real classes: audio folder -> v3 -> validate -> train.

The fixtures build an official-layout checkpoint tree: `dit/` (our tiny ACE-Step via save_full_model), `vae/` (a
diffusers AutoencoderOobleck: 25 latent frames/s x 64 channels like the real one, but at 2.4 kHz with hop 96 and
128-wide layers, so that a CPU encodes seconds of audio in well under a second) and `Qwen3-Embedding-0.6B/` (a
2-layer transformers Qwen3Model of the tiny model's text width + a WordLevel tokenizer built with `tokenizers`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from acestep_ft.config import Conditions, HardwareConfig, PreprocessConfig
from acestep_ft.data.batch import ConditionWidths
from acestep_ft.data.fingerprint import read_fingerprint
from acestep_ft.data.v3_reader import V3Directory
from acestep_ft.errors import UserError
from acestep_ft.model import load_model, save_full_model
from acestep_ft.model.checkpoint_io import condition_encoder_digest
from acestep_ft.preprocess import pipeline
from acestep_ft.preprocess.encoders import Encoders
from conftest import model_config

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("# Instruction Fill the audio semantic mask based on given conditions: Caption Metas - bpm timesignature "
         "keyscale duration seconds N/A [Instrumental] la da di lofi piano warm tape noise synth pop 4 C major "
         "A minor 90 120 1 2 3 5 6 7 8 9 0 Languages Lyric unknown en").split()


def tiny_vae(seed: int = 0):
    """AutoencoderOobleck with the ACE-Step latent geometry (25 frames/s, 64 channels) at a tenth of the rate."""
    from diffusers import AutoencoderOobleck

    torch.manual_seed(seed)
    return AutoencoderOobleck(encoder_hidden_size=128, downsampling_ratios=[2, 4, 4, 3], channel_multiples=[1, 1, 1, 1],
                              decoder_channels=8, decoder_input_channels=64, audio_channels=2,
                              sampling_rate=2400).eval()


def tiny_text_encoder(directory: Path, hidden: int, seed: int = 0) -> None:
    """A 2-layer Qwen3Model + a WordLevel tokenizer (pad = <|endoftext|> as Qwen's), saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    vocab = {tok: i for i, tok in enumerate(["<unk>", "<|endoftext|>", *dict.fromkeys(WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", padding_side="right")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024)
    Qwen3Model(cfg).eval().save_pretrained(directory)


def build_checkpoints(root: Path) -> Path:
    """root/{dit, vae, Qwen3-Embedding-0.6B}; returns the DiT directory (model.path)."""
    cfg = model_config("tiny")
    torch.manual_seed(0)
    dit = save_full_model(load_model(cfg), root / "dit")
    torch.save(torch.randn(1, 64, 300), dit / "silence_latent.pt")  # official layout [1, 64, Ts]
    tiny_vae().save_pretrained(root / "vae")
    tiny_text_encoder(root / "Qwen3-Embedding-0.6B", cfg.text_hidden_dim)
    return dit


def tone(seconds: float, rate: int, channels: int, freq: float = 220.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.05, (t.size, channels))
    return (0.3 * np.sin(2 * np.pi * freq * t)[:, None] + noise).astype(np.float32)


def build_songs(root: Path) -> Path:
    """Seven files: five usable (rates, channel counts, an mp3, sidecar kinds), one corrupt, one uncaptioned."""
    songs = root / "music"
    (songs / "album").mkdir(parents=True)
    sf.write(songs / "a_mono.wav", tone(2.0, 22050, 1), 22050)
    (songs / "a_mono.txt").write_text("lofi piano warm tape noise")
    sf.write(songs / "album" / "b_stereo.flac", tone(3.2, 44100, 2, 330), 44100)
    (songs / "album" / "b_stereo.json").write_text(json.dumps(
        {"caption": "synth pop", "lyrics": "la da di", "bpm": 120, "keyscale": "C major", "timesignature": "4",
         "language": "en"}))
    sf.write(songs / "c_surround.wav", tone(1.5, 48000, 4, 440), 48000)
    (songs / "c_surround.txt").write_text("warm synth")
    (songs / "c_surround.lyrics.txt").write_text("da di da")
    sf.write(songs / "d.mp3", tone(2.0, 44100, 2, 262), 44100, format="MP3")
    (songs / "d.json").write_text(json.dumps({"caption": "piano", "bpm": "90.0"}))
    sf.write(songs / "e_long.wav", tone(4.0, 16000, 1, 500), 16000)
    (songs / "e_long.txt").write_text("lofi synth")
    (songs / "f_corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage" * 4)
    (songs / "f_corrupt.txt").write_text("noise")
    sf.write(songs / "g_uncaptioned.wav", tone(1.2, 48000, 2), 48000)
    return songs


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    return build_checkpoints(root / "ckpt"), build_songs(root)


def run_script(*overrides: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "preprocess.py"), *overrides], cwd=cwd,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"}, capture_output=True, text=True, timeout=300)


def read_all(path: Path) -> dict:
    v3 = V3Directory(path, 64, verify_checksums=True)
    tensors = [{k: v for k, v in vars(v3[i]).items() if isinstance(v, torch.Tensor)} for i in range(len(v3))]
    return {v3[i].key: (tensors[i], v3.metadata(i)) for i in range(len(v3))}


def test_script_builds_a_dataset_that_validates_and_trains(tree, tmp_path):
    dit, songs = tree
    out = tmp_path / "out"
    proc = run_script("model=tiny", f"model.path={dit}", "hardware=cpu", f"preprocess.input_dir={songs}",
                      f"preprocess.output_dir={out}", "preprocess.chunk_seconds=2.0", "preprocess.overlap_seconds=0.4",
                      "preprocess.max_seconds=3.0", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5 songs in the dataset" in proc.stdout and "2 skipped" in proc.stdout
    assert "skipped f_corrupt.wav: unreadable" in proc.stdout
    assert "skipped g_uncaptioned.wav: no caption (add g_uncaptioned.json or g_uncaptioned.txt)" in proc.stdout
    assert not (out / ".work").exists() and sorted(p.name for p in out.iterdir())[-2:] == ["index.jsonl",
                                                                                          "shard-00000.tar"]
    data = read_all(out)
    assert sorted(data) == ["a_mono.wav", "album/b_stereo.flac", "c_surround.wav", "d.mp3", "e_long.wav"]
    tensors, meta = data["album/b_stereo.flac"]
    assert tensors["target_latents"].shape == (75, 64) and tensors["target_latents"].dtype == torch.bfloat16  # 3 s
    assert meta["duration"] == 3 and meta["lyrics"] == "la da di" and meta["bpm"] == 120
    assert data["e_long.wav"][0]["target_latents"].shape[0] == 75  # 4 s truncated to max_seconds=3
    assert data["a_mono.wav"][1]["lyrics"] == "[Instrumental]" and data["d.mp3"][1]["bpm"] == 90
    silence = torch.load(dit / "silence_latent.pt")[0].T
    ctx = tensors["context_latents"].float()
    assert torch.equal(ctx[:, :64], silence[:75].bfloat16().float()) and bool((ctx[:, 64:] == 1).all())
    torch.manual_seed(0)
    fp = read_fingerprint(out)
    assert fp["condition_encoder_digest"] == condition_encoder_digest(load_model(replace(model_config("tiny"),
                                                                                         path=str(dit))))
    assert fp["settings"]["sample_rate"] == 2400 and fp["settings"]["dtype"] == "bfloat16"
    assert all(fp[k] for k in ("vae_digest", "text_encoder_digest", "tokenizer_digest"))

    validate = subprocess.run([sys.executable, "-m", "acestep_ft.data.validate", "--dataset-dir", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert validate.returncode == 0, validate.stdout[-2000:] + validate.stderr[-2000:]
    train = subprocess.run([sys.executable, "train.py", "dataset=preprocessed", f"dataset.path={out}", "model=tiny",
                            f"model.path={dit}", "hardware=cpu", "train.max_steps=3", "train.plot=false",
                            "hardware.batch_size=2", "train.samples.every_epochs=1", "train.samples.sampler.steps=2",
                            "logger=tensorboard", f"hydra.run.dir={tmp_path / 'train'}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert train.returncode == 0, train.stderr[-3000:]
    assert f"data fingerprint of {out}: matches the model" in train.stdout
    # samples decoded with the checkpoint's VAE (found beside model.path): one wav per sampled condition
    assert "latents decoded to audio with the VAE" in train.stdout
    wavs = sorted((tmp_path / "train" / "samples" / "step-00000003").glob("*.wav"))
    assert len(wavs) == 2
    import soundfile

    from safetensors.torch import load_file

    latents = load_file(str(tmp_path / "train" / "samples" / "step-00000003.safetensors"))
    for wav in wavs:
        audio, rate = soundfile.read(str(wav))
        frames = next(v.shape[0] for k, v in latents.items() if wav.stem == k.replace("/", "_"))
        assert rate == 2400 and audio.shape[1] == 2 and abs(audio.shape[0] - frames * 96) < 96  # T x hop, stereo
        assert float(abs(audio).max()) > 0


def config(songs: Path, out: Path, **kw) -> PreprocessConfig:
    return PreprocessConfig(input_dir=str(songs), output_dir=str(out), **{"chunk_seconds": 2.0, "overlap_seconds": 0.4,
                                                                          "max_seconds": 3.0, **kw})


def test_an_interrupted_run_resumes_with_only_the_rest_and_equals_an_uninterrupted_one(tree, tmp_path, monkeypatch):
    dit, songs = tree
    model = replace(model_config("tiny"), path=str(dit))
    hw = HardwareConfig(device="cpu", mixed_precision="no")
    loaded = Encoders.load(model, config(songs, tmp_path / "x"), hw)  # load once; every run below reuses it
    calls: list[str] = []
    real_encode = Encoders.encode

    def counting(self, clip, song, key):
        calls.append(key)
        if key == interrupt_at:
            raise KeyboardInterrupt  # a kill between two songs
        return real_encode(self, clip, song, key)

    monkeypatch.setattr(Encoders, "encode", counting)
    reference = tmp_path / "reference"
    interrupt_at = None
    assert pipeline.preprocess(config(songs, reference), model, hw, progress=False, load=lambda *a: loaded).ok

    out = tmp_path / "out"
    calls.clear()
    interrupt_at = "c_surround.wav"
    with pytest.raises(KeyboardInterrupt):
        pipeline.preprocess(config(songs, out), model, hw, progress=False, load=lambda *a: loaded)
    assert calls == ["a_mono.wav", "album/b_stereo.flac", "c_surround.wav"]
    assert not (out / "index.jsonl").exists() and len(list((out / ".work" / "songs").glob("*.json"))) == 2

    with pytest.raises(UserError, match="other weights or settings"):  # other settings: refused, with the fix
        pipeline.preprocess(config(songs, out, seed=1), model, hw, progress=False, load=lambda *a: loaded)
    for other in ({"store": "both"}, {"lyric_format": "raw"}):  # what is stored / how lyrics read
        with pytest.raises(UserError, match=f"settings.{next(iter(other))}: "):
            pipeline.preprocess(config(songs, out, **other), model, hw, progress=False, load=lambda *a: loaded)

    calls.clear()
    interrupt_at = None
    summary = pipeline.preprocess(config(songs, out), model, hw, progress=False, load=lambda *a: loaded)
    assert calls == ["c_surround.wav", "d.mp3", "e_long.wav"]
    assert summary.resumed == ["a_mono.wav", "album/b_stereo.flac"] and len(summary.encoded) == 3
    assert sorted(summary.skipped) == ["f_corrupt.wav", "g_uncaptioned.wav"]
    ref, got = read_all(reference), read_all(out)
    assert list(ref) == list(got)
    for key, (tensors, meta) in ref.items():
        assert meta == got[key][1]
        assert tensors.keys() == got[key][0].keys()
        for name, t in tensors.items():
            assert torch.equal(t, got[key][0][name]), (key, name)
    assert read_fingerprint(reference) == read_fingerprint(out)
    with pytest.raises(UserError, match="already holds a finished dataset"):
        pipeline.preprocess(config(songs, out), model, hw, progress=False, load=lambda *a: loaded)


def test_nothing_processable_exits_1(tree, tmp_path):
    dit, songs = tree
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(songs / "f_corrupt.wav", bad / "x.wav")
    (bad / "x.txt").write_text("noise")
    proc = run_script("model=tiny", f"model.path={dit}", "hardware=cpu", f"preprocess.input_dir={bad}",
                      f"preprocess.output_dir={tmp_path / 'o'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 1 and "skipped x.wav: unreadable" in proc.stdout and "no dataset written" in proc.stdout
    assert not (tmp_path / "o").exists()


# --- preprocess.store and preprocess.lyric_format -------------------------------------------------------------------

ENCODER_OUTPUTS = {"encoder_hidden_states", "encoder_attention_mask"}
ENCODER_INPUTS = {"text_hidden_states", "text_attention_mask", "text_token_ids", "lyric_token_ids",
                  "lyric_attention_mask", "refer_audio_latents"}
ALWAYS = {"target_latents", "attention_mask", "context_latents"}
SHORT = {"max_seconds": 1.0}  # one second of audio per song: the VAE takes most of the time


def read_members(path: Path) -> dict:
    """{name: (tensors, metadata)} read straight from the shards with safetensors, at the offsets index.jsonl gives
    (independent of the v3 reader's key set)."""
    import safetensors.torch

    lines = (path / "index.jsonl").read_text(encoding="utf-8").splitlines()[1:]
    out = {}
    for entry in map(json.loads, lines):
        data = (path / entry["shard"]).read_bytes()
        tensors = safetensors.torch.load(data[entry["offset"]: entry["offset"] + entry["length"]])
        start, length = entry["json"]
        out[entry["name"]] = tensors, json.loads(data[start: start + length])["metadata"]
    return out


@pytest.fixture(scope="module")
def two_songs(tree, tmp_path_factory):
    """(DiT dir, a folder with b_stereo.flac (lyrics, language en) and a_mono.wav (instrumental, no language))."""
    dit, songs = tree
    small = tmp_path_factory.mktemp("two")
    for name in ("a_mono.wav", "a_mono.txt", "album/b_stereo.flac", "album/b_stereo.json"):
        (small / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(songs / name, small / name)
    return dit, small


@pytest.fixture(scope="module")
def stores(two_songs, tmp_path_factory):
    """{store: (dataset dir, Encoders)}: outputs and both (raw lyrics, float32), and inputs with the official lyric
    template in bfloat16 (ids must stay int64 there)."""
    dit, songs = two_songs
    root = tmp_path_factory.mktemp("stores")
    model = replace(model_config("tiny"), path=str(dit))
    hw = HardwareConfig(device="cpu", mixed_precision="no")
    raw = {"lyric_format": "raw", "lyric_max_tokens": 512}  # the official trainer's earlier preprocessing
    runs = {"outputs": config(songs, root / "outputs", dtype="float32", **raw, **SHORT),
            "both": config(songs, root / "both", dtype="float32", store="both", **raw, **SHORT),
            "inputs": config(songs, root / "inputs", store="inputs", lyric_format="official_template", **SHORT)}
    done = {}
    for store, pre in runs.items():
        enc = Encoders.load(model, pre, hw)
        assert pipeline.preprocess(pre, model, hw, progress=False, load=lambda *a: enc).ok
        done[store] = Path(pre.output_dir), enc
    return done


def test_each_store_writes_its_keys_with_ids_as_int64_within_the_vocabulary(stores):
    expected = {"outputs": ALWAYS | ENCODER_OUTPUTS, "inputs": ALWAYS | ENCODER_INPUTS,
                "both": ALWAYS | ENCODER_OUTPUTS | ENCODER_INPUTS}
    for store, (out, enc) in stores.items():
        data = read_members(out)
        assert sorted(data) == ["a_mono.wav", "album/b_stereo.flac"]
        float_dtype = torch.bfloat16 if store == "inputs" else torch.float32
        for name, (tensors, meta) in data.items():
            assert set(tensors) == expected[store], (store, name)
            for key, t in tensors.items():
                ids = key.endswith("_token_ids")
                assert t.dtype == (torch.int64 if ids else float_dtype), (store, key, t.dtype)
            assert meta["lyrics"] == ("la da di" if name.endswith("flac") else "[Instrumental]")
            if store == "outputs":
                continue
            vocab = enc.text_model.get_input_embeddings().weight.shape[0]
            for key in ("text_token_ids", "lyric_token_ids"):
                assert 0 <= int(tensors[key].min()) and int(tensors[key].max()) < vocab
            lt, d_text = tensors["text_hidden_states"].shape
            assert lt == 256 and d_text == 32 and tensors["text_attention_mask"].shape == (256,)
            assert tensors["text_token_ids"].shape == (256,) and tensors["lyric_attention_mask"].shape == \
                tensors["lyric_token_ids"].shape
            assert tensors["refer_audio_latents"].shape == (1, 1, 64) and not tensors["refer_audio_latents"].any()
    widths = ConditionWidths(encoder=64, text=32, vocab=model_config("tiny").text_vocab_size)
    for store in ("inputs", "both"):  # the data layer reads them as encoder_inputs data
        v3 = V3Directory(stores[store][0], widths, verify_checksums=True, conditions=Conditions.encoder_inputs)
        assert len(v3) == 2 and v3[0].key == "a_mono.wav"
    raw = read_members(stores["both"][0])["a_mono.wav"][0]
    assert raw["lyric_token_ids"].shape == (512,) and raw["lyric_attention_mask"].sum() == 1  # padded to 512
    template = read_members(stores["inputs"][0])["a_mono.wav"][0]  # official template: not padded
    assert template["lyric_token_ids"].shape == (7,) and bool((template["lyric_attention_mask"] == 1).all())


def test_store_both_is_outputs_plus_inputs_and_the_inputs_reproduce_the_outputs(stores, two_songs):
    from transformers import AutoModel, AutoTokenizer

    from acestep_ft.preprocess.captions import Song, caption_prompt

    dit, _ = two_songs
    outputs, both = read_members(stores["outputs"][0]), read_members(stores["both"][0])
    qwen = dit.parent / "Qwen3-Embedding-0.6B"
    tokenizer, text_model = AutoTokenizer.from_pretrained(str(qwen)), AutoModel.from_pretrained(str(qwen)).eval()
    encoder = load_model(replace(model_config("tiny"), path=str(dit))).encoder.eval()
    song = Song("synth pop", lyrics="la da di", bpm=120, keyscale="C major", timesignature="4", language="en")
    for name, (tensors, meta) in both.items():
        assert meta == outputs[name][1]
        for key, t in outputs[name][0].items():  # the outputs part is a store=outputs run, bit for bit
            assert torch.equal(tensors[key], t), (name, key)
        if name != "album/b_stereo.flac":
            continue
        with torch.no_grad():
            tok = tokenizer(caption_prompt(song, meta["duration"]), padding="max_length", max_length=256,
                            return_tensors="pt")
            assert torch.equal(tensors["text_token_ids"], tok.input_ids[0])
            assert torch.equal(tensors["text_hidden_states"], text_model(tok.input_ids).last_hidden_state[0])
            lyric = tokenizer("la da di", padding="max_length", max_length=512, return_tensors="pt")
            assert torch.equal(tensors["lyric_token_ids"], lyric.input_ids[0])
            # the condition encoder on the stored inputs (lyric ids through the text encoder's embedding table, the
            # stored zero reference) gives the stored outputs
            hidden, mask = encoder(tensors["text_hidden_states"][None], tensors["text_attention_mask"][None],
                                   text_model.get_input_embeddings()(tensors["lyric_token_ids"])[None],
                                   tensors["lyric_attention_mask"][None], tensors["refer_audio_latents"],
                                   torch.zeros(1, dtype=torch.long))
        assert torch.equal(hidden[0], tensors["encoder_hidden_states"])
        assert torch.equal(mask[0].float(), tensors["encoder_attention_mask"])


def test_the_official_lyric_template_is_tokenized_unpadded_with_the_song_language(stores):
    out, enc = stores["inputs"]
    data = read_members(out)
    words = {name: enc.tokenizer.convert_ids_to_tokens(t["lyric_token_ids"].tolist()) for name, (t, _) in data.items()}
    assert words["album/b_stereo.flac"] == ["#", "Languages", "en", "#", "Lyric", "la", "da", "di", "<|endoftext|>"]
    assert words["a_mono.wav"] == ["#", "Languages", "unknown", "#", "Lyric", "[Instrumental]", "<|endoftext|>"]
    assert data["album/b_stereo.flac"][1]["language"] == "en" and data["a_mono.wav"][1]["language"] == "unknown"
    settings = {store: read_fingerprint(path)["settings"] for store, (path, _) in stores.items()}
    assert settings["inputs"]["lyric_format"] == "official_template" and settings["inputs"]["store"] == "inputs"
    assert settings["outputs"]["lyric_format"] == "raw" and settings["both"]["store"] == "both"


def test_store_inputs_fingerprint_ignores_the_condition_encoder_but_not_the_text_encoder(stores, two_songs,
                                                                                        tmp_path):
    from safetensors.torch import load_file, save_file

    out, enc = stores["inputs"]
    assert enc.condition_encoder is None  # not even loaded
    written = read_fingerprint(out)
    assert written["condition_encoder_digest"] is None and written["model_variant"] is None
    assert all(written[k] for k in ("vae_digest", "text_encoder_digest", "tokenizer_digest"))

    def fingerprint(root: Path, store: str) -> dict:
        pre = config(root, tmp_path / "unused", store=store, lyric_format="official_template", **SHORT)
        model = replace(model_config("tiny"), path=str(root / "dit"))
        return Encoders.load(model, pre, HardwareConfig(device="cpu", mixed_precision="no")).fingerprint(
            pipeline.settings_of(pre))

    original = two_songs[0].parent  # dit/, vae/, Qwen3-Embedding-0.6B/
    other_encoder, other_text = tmp_path / "enc", tmp_path / "text"
    for copy in (other_encoder, other_text):
        shutil.copytree(original, copy)
    weights = load_file(str(other_encoder / "dit" / "model.safetensors"))
    save_file({k: v + 0.5 if k.startswith("encoder.") else v for k, v in weights.items()},
              str(other_encoder / "dit" / "model.safetensors"), metadata={"format": "pt"})
    tiny_text_encoder(other_text / "Qwen3-Embedding-0.6B", model_config("tiny").text_hidden_dim, seed=1)
    assert fingerprint(other_encoder, "inputs") == fingerprint(original, "inputs") == written
    assert fingerprint(other_text, "inputs")["text_encoder_digest"] != written["text_encoder_digest"]
    # the check can fail: with the encoder's outputs stored, its weights are part of the fingerprint
    assert fingerprint(other_encoder, "outputs")["condition_encoder_digest"] != \
        fingerprint(original, "outputs")["condition_encoder_digest"]
