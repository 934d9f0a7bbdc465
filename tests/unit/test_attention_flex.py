"""model.attn_implementation=flex: FlexAttention with block-sparse band masks equals the eager (official) path.

On the CPU flex runs torch's un-compiled reference implementation (the compiled kernel is for a CUDA GPU), so these
tests check the masks, GQA, scale and the padding rules, not speed.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import model_config

from acestep_ft.model import load_model
from acestep_ft.model.layers import FLEX_BLOCK, band_mask, combine_masks, flex_block_mask

flex_api = pytest.importorskip("torch.nn.attention.flex_attention")

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
CPU = torch.device("cpu")
T, COND = 41, 6  # 21 patches against sliding_window 4: the band cuts


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = load_model(model_config("tiny", use_sliding_window=True, sliding_window=4)).eval()
    assert model.decoder.dims.sliding_window == 4 and model.decoder.dims.num_kv_heads < model.decoder.dims.num_heads
    return model


def decoder_batch(masked: bool):
    g = torch.Generator().manual_seed(1)
    b = {"hidden_states": torch.randn(2, T, 64, generator=g), "timestep": torch.tensor([0.3, 0.9]),
         "timestep_r": torch.tensor([0.3, 0.9]), "encoder_hidden_states": torch.randn(2, COND, 64, generator=g),
         "context_latents": torch.randn(2, T, 128, generator=g)}
    if masked:
        # sample 1: 7 of 21 patches real, so padded patches lie further than the window from any real key
        # (rows that see no key, which must see every key as in combine_masks)
        b["attention_mask"] = (torch.arange(T) < torch.tensor([[T], [14]])).float()
        b["encoder_attention_mask"] = (torch.arange(COND) < torch.tensor([[COND], [3]])).float()
    return b


def run(model, impl, fn):
    model.set_attn_implementation(impl)
    try:
        return fn()
    finally:
        model.set_attn_implementation("eager")


# ---------------------------------------------------------------- the block mask


@pytest.mark.parametrize("length,window", [(300, 20), (21, 4)])
def test_block_mask_has_the_dense_mask_semantics_and_torchs_tiles(length, window):
    g = torch.Generator().manual_seed(length)
    valid = torch.rand(3, length, generator=g) > 0.3
    valid[1, 50:] = False  # long padding tail: rows beyond the window see no key
    valid[2] = False  # an all-padding sample
    for win in (window, None):
        for key_valid in (valid, None):
            block = flex_block_mask(length, win, key_valid, CPU)
            dense = combine_masks(None if win is None else band_mask(length, win, CPU), key_valid)
            if block is None:
                assert dense is None
                continue
            b = block.kv_num_blocks.shape[0]
            element = flex_api.create_mask(block.mask_mod, b, 1, length, length, device=CPU)
            assert torch.equal(element, dense.expand_as(element))
            ref = flex_api.create_block_mask(block.mask_mod, b, None, length, length, device=CPU)
            assert torch.equal(block.kv_num_blocks, ref.kv_num_blocks)
            assert torch.equal(block.full_kv_num_blocks, ref.full_kv_num_blocks)
            assert torch.equal(block.to_dense(), ref.to_dense())


def test_band_block_mask_skips_tiles_far_from_the_diagonal():
    tiles = 1024 // FLEX_BLOCK  # 8 x 8
    narrow = flex_block_mask(1024, 16, None, CPU)
    assert narrow.kv_num_blocks.shape == (1, 1, tiles)  # no padding: one mask broadcast over the batch
    near = (torch.arange(tiles)[:, None] - torch.arange(tiles)[None]).abs() <= 1
    assert torch.equal(narrow.to_dense()[0, 0].bool(), near)  # 22 of 64 tiles computed
    assert int(narrow.kv_num_blocks.sum()) == 22 and int(narrow.full_kv_num_blocks.sum()) == 0
    assert narrow.sparsity() > 60
    # |q - kv| <= 200: diagonal tiles are full (no mask_mod), |i - j| in {1, 2} partial, the rest skipped
    wide = flex_block_mask(1024, 200, None, CPU)
    assert int(wide.full_kv_num_blocks.sum()) == 8 and int(wide.kv_num_blocks.sum()) == 2 * 7 + 2 * 6
    assert flex_block_mask(1024, None, None, CPU) is None  # full attention without padding: no mask at all
    assert flex_block_mask(20, 19, None, CPU) is None  # a band wider than the sequence is full attention


# ---------------------------------------------------------------- the model
# Every model test uses batch 2 and 21 positions, so torch's flex traces (one per mask kind and grad mode) are shared.


def outputs_and_grads(model, impl, masked):
    """Decoder output and the gradients of every decoder parameter for one MSE loss."""
    b = decoder_batch(masked)
    target = torch.randn(2, T, 64, generator=torch.Generator().manual_seed(2))

    def step():
        model.decoder.zero_grad(set_to_none=True)
        out = model.decoder(**b)
        F.mse_loss(out, target).backward()
        grads = {n: p.grad.clone() for n, p in model.decoder.named_parameters() if p.requires_grad}
        model.decoder.zero_grad(set_to_none=True)
        return out.detach(), grads

    return run(model, impl, step)


def test_flex_backward_on_the_cpu_says_what_to_use(tiny):
    with pytest.raises(NotImplementedError, match="attn_implementation=flex.*CPU.*sdpa"):
        outputs_and_grads(tiny, "flex", masked=False)


# masked: band and full layers with key padding and rows that see no key (the default suite); unmasked: the broadcast
# band mask and mask-free full layers (torch traces two more flex variants: slow on this CPU)
@pytest.mark.parametrize("masked", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_decoder_flex_equals_eager_outputs_and_gradients(tiny, monkeypatch, masked):
    # torch refuses flex's backward on the CPU by a device check only; lifting it runs flex's own reference backward
    # (the formula its CUDA kernel implements) so the gradients through the BlockMask can be compared here
    monkeypatch.setattr(flex_api, "_validate_device", lambda *_: None)
    seen = []
    hook = tiny.decoder.layers[0].register_forward_pre_hook(lambda _, args: seen.append(type(args[3]).__name__))
    try:
        out_e, grads_e = outputs_and_grads(tiny, "eager", masked)
        out_f, grads_f = outputs_and_grads(tiny, "flex", masked)
    finally:
        hook.remove()
    assert seen == ["Tensor", "BlockMask"]  # layer 0 is a band layer: flex got a BlockMask, not a dense mask
    torch.testing.assert_close(out_f, out_e, atol=1e-5, rtol=0)
    assert out_e.abs().mean() > 0.1  # a real signal, not zeros on both sides
    assert list(grads_f) == list(grads_e) and len(grads_e) > 20
    assert sum(float(g.abs().sum()) for g in grads_e.values()) > 0
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_f[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_encoder_stack_flex_equals_eager(tiny):
    """EncoderStack.run_layers (lyric encoder: band and full layers with key padding), without autograd as in
    preprocessing; the unmasked path is the decoder's above."""
    g = torch.Generator().manual_seed(3)
    lyrics = torch.randn(2, 21, 32, generator=g)
    mask = (torch.arange(21) < torch.tensor([[21], [6]])).long()  # sample 1: 15 padded tokens, more than the window
    with torch.no_grad():
        eager = tiny.encoder.lyric_encoder(lyrics, mask)
        flex = run(tiny, "flex", lambda: tiny.encoder.lyric_encoder(lyrics, mask))
    torch.testing.assert_close(flex, eager, atol=1e-5, rtol=0)
    assert eager.abs().mean() > 0.1


@pytest.mark.slow
def test_compiled_dit_layers_take_block_masks_without_recompiling():
    """Regional compile (layer.compile()) with BlockMask arguments: same outputs, and a new mask per forward (other
    padding) reuses the graphs; only the mask kinds (band, full) are separate graphs."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = load_model(model_config("tiny", attn_implementation="flex")).eval()
    batches = []
    for seed, keep in ((1, 14), (2, 30), (3, 9)):
        b = decoder_batch(masked=True)
        b["hidden_states"] = torch.randn(2, T, 64, generator=torch.Generator().manual_seed(seed))
        b["attention_mask"] = (torch.arange(T) < torch.tensor([[T], [keep]])).float()
        batches.append(b)
    with torch.no_grad():
        plain = [model.decoder(**b) for b in batches]
        counter = CompileCounter()
        for layer in model.decoder.layers:
            layer.compile(backend=counter)
        for b, ref in zip(batches, plain):
            torch.testing.assert_close(model.decoder(**b), ref, atol=1e-6, rtol=0)
    assert counter.frame_count == 2  # DiTLayer.forward once per mask kind, not once per forward


def test_flex_is_an_accepted_setting(tiny):
    assert load_model(model_config("tiny", attn_implementation="flex")).decoder.attn_implementation() == "flex"
    with pytest.raises(ValueError, match="'sdpa', 'eager' or 'flex'"):
        tiny.set_attn_implementation("flash")
