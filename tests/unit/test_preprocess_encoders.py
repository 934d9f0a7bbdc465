"""Preprocessing encoders: chunked VAE encoding equals whole-song encoding, sampling equals diffusers', the
silence context, and digests that are functions of the weights only."""

import re
from dataclasses import replace

import pytest
import torch

from acestep_ft.config import HardwareConfig, PreprocessConfig
from acestep_ft.errors import ConfigError
from acestep_ft.preprocess.encoders import (Encoders, component_paths, context_latents, sample_latents, song_seed,
                                            tokenizer_digest, vae_posterior)
from conftest import model_config
from test_preprocess import build_checkpoints, tiny_vae

# tiny_vae: 2.4 kHz, hop 96 (25 frames/s); an impulse moves the latents of frames within +-20 of it
RECEPTIVE_FRAMES = 20


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


def test_chunked_encoding_equals_whole_song_when_the_overlap_covers_the_receptive_field(vae):
    torch.manual_seed(1)
    audio = torch.randn(2, 2400 * 4 + 50)  # 100 frames + a partial one
    whole = vae_posterior(vae, audio, chunk_frames=10**6, overlap_frames=0)
    assert whole.shape == (128, 100)
    chunked = vae_posterior(vae, audio, chunk_frames=75, overlap_frames=RECEPTIVE_FRAMES + 5)  # 3 s, 1 s each side
    assert chunked.shape == whole.shape
    assert (chunked - whole).abs().max() < 1e-4
    seams = vae_posterior(vae, audio, chunk_frames=75, overlap_frames=0)  # no context: the seams show
    assert (seams - whole).abs().max() > 1e-2


def test_the_sample_is_diffusers_latent_dist_sample_and_depends_only_on_seed_and_key(vae):
    torch.manual_seed(2)
    audio = torch.randn(2, 2400 * 2)
    with torch.no_grad():
        expected = vae.encode(audio[None]).latent_dist.sample(generator=torch.Generator().manual_seed(7))[0].T
    got = sample_latents(vae_posterior(vae, audio, 10**6, 0), torch.Generator().manual_seed(7))
    assert got.shape == (50, 64) and torch.allclose(got, expected, atol=1e-6)
    assert song_seed(0, "a.wav") == song_seed(0, "a.wav") != song_seed(0, "b.wav") != song_seed(1, "a.wav")


def test_context_latents_slice_or_tile_the_silence_and_end_in_ones():
    silence = torch.arange(3 * 64, dtype=torch.float32).reshape(3, 64)
    ctx = context_latents(silence, 5)
    assert ctx.shape == (5, 128) and torch.equal(ctx[:, :64], silence[[0, 1, 2, 0, 1]])
    assert bool((ctx[:, 64:] == 1).all())
    assert torch.equal(context_latents(None, 2)[:, :64], torch.zeros(2, 64))


def test_digests_do_not_depend_on_the_compute_dtype_and_a_missing_model_path_is_refused(tmp_path):
    dit = build_checkpoints(tmp_path)
    model = replace(model_config("tiny"), path=str(dit))
    pre = PreprocessConfig(input_dir="x", output_dir="y")
    fp32 = Encoders.load(model, pre, HardwareConfig(device="cpu", mixed_precision="no"))
    bf16 = Encoders.load(model, pre, HardwareConfig(device="cpu", mixed_precision="bf16"))
    assert bf16.dtype == torch.bfloat16 and next(bf16.vae.parameters()).dtype == torch.bfloat16
    same = ("condition_encoder", "vae", "text_encoder", "tokenizer", "silence_latent")
    assert {k: fp32.digests[k] for k in same} == {k: bf16.digests[k] for k in same}
    assert fp32.fingerprint({})["settings"]["compute_dtype"] == "float32"
    tok = fp32.tokenizer
    before = tokenizer_digest(tok)
    tok("a b c", padding="max_length", max_length=9, truncation=True)  # run-time padding state is not hashed
    assert tokenizer_digest(tok) == before
    tok.add_tokens(["newword"])
    assert tokenizer_digest(tok) != before
    with pytest.raises(ConfigError, match="model.path is required"):
        component_paths(replace(model, path=None), pre)
    with pytest.raises(ConfigError, match="preprocess.vae_path"):
        component_paths(model, replace(pre, vae_path=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="model.path"):  # a DiT directory that does not exist
        component_paths(replace(model, path=str(tmp_path / "nope" / "dit")),
                        replace(pre, vae_path=str(dit.parent / "vae")))
    wrong_text = re.escape(f"text encoder: {tmp_path / 'qwen'} (set model.text_encoder_path)")
    with pytest.raises(ConfigError, match=wrong_text):
        component_paths(replace(model, text_encoder_path=str(tmp_path / "qwen")), pre)


def test_a_tokenizer_larger_than_the_embedding_table_is_refused(tmp_path):
    from transformers import AutoTokenizer

    from acestep_ft.preprocess.encoders import load_text_encoder
    from test_preprocess import tiny_text_encoder

    tiny_text_encoder(tmp_path, hidden=32)
    tokenizer, model = load_text_encoder(tmp_path, 32, "model.text_encoder_path")
    assert len(tokenizer) == model.get_input_embeddings().weight.shape[0]
    grown = AutoTokenizer.from_pretrained(str(tmp_path))
    grown.add_tokens(["beyond"])  # an id the embedding table has no row for
    grown.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"tokenizer has \d+ tokens but the text encoder's embedding table only"):
        load_text_encoder(tmp_path, 32, "model.text_encoder_path")
