"""hardware.compile: regional torch.compile of the DiT layers (acestep_ft/model/compile.py).

Fast: the wiring (each layer's forward replaced, parameters and state dict untouched, idempotent) and the refusals
(no C++ compiler; a failing compile) as UserErrors naming the setting. Slow: inductor-compiled vs eager decoder,
forward and backward, on the tiny model with a LoRA adapter (one compile of the two layer variants takes about two
minutes of CPU the first time; inductor's on-disk cache makes later runs faster).
"""

import copy

import pytest
import torch
from conftest import model_config
from torch import nn
from torch._dynamo.utils import counters

from acestep_ft.config import LoraMode
from acestep_ft.errors import UserError
from acestep_ft.model import compile as compile_mod
from acestep_ft.model import load_model
from acestep_ft.model.compile import check_compile_available, compile_layers
from acestep_ft.model.decoder import DiTLayer
from acestep_ft.train.trainable import make_trainable


def lora_decoder(seed: int = 0) -> nn.Module:
    """The tiny decoder under a LoRA adapter (no dropout: eager and inductor draw different masks) whose B matrices
    are non-zero, so the adapters change the output and receive gradients of their own."""
    torch.manual_seed(seed)
    decoder = make_trainable(load_model(model_config("tiny")), LoraMode(dropout=0.0))
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return decoder


def decoder_inputs(length: int, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(length)
    t = torch.rand(batch, generator=g)
    return {"hidden_states": torch.randn(batch, length, 64, generator=g), "timestep": t, "timestep_r": t,
            "encoder_hidden_states": torch.randn(batch, 12, 64, generator=g),
            "context_latents": torch.randn(batch, length, 128, generator=g)}


def test_compile_layers_replaces_each_layer_forward_and_keeps_the_weights(monkeypatch):
    monkeypatch.setattr(compile_mod, "check_compile_available", lambda device: None)  # the probe is tested below
    decoder = lora_decoder()
    keys = list(decoder.state_dict())
    assert compile_layers(decoder) == 2
    layers = [m for m in decoder.modules() if isinstance(m, DiTLayer)]
    forwards = [layer.forward for layer in layers]
    assert all(f.compiled_layer for f in forwards)
    assert list(decoder.state_dict()) == keys  # no wrapper module: checkpoints and exports keep their names
    assert compile_layers(decoder) == 2 and [layer.forward for layer in layers] == forwards  # not compiled twice


def test_a_compile_that_fails_is_a_user_error_naming_the_setting():
    def failing_backend(gm, example_inputs):
        raise RuntimeError("no kernel for this op")

    forward = compile_mod._compiled_forward(nn.Linear(4, 4), failing_backend)
    with pytest.raises(UserError, match=r"hardware\.compile=true.*no kernel for this op.*hardware\.compile=false"):
        forward(torch.ones(2, 4))


def test_a_missing_cxx_compiler_is_refused_up_front():
    from torch._inductor import config as inductor_config
    from torch._inductor.cpp_builder import cpp_compiler_search

    # no compiler on the search list; no cache either (a cached probe kernel needs no compiler)
    no_cxx = inductor_config.patch({"cpp.cxx": ("no-such-c++",), "force_disable_caches": True})
    cpp_compiler_search.cache_clear()
    torch._dynamo.reset()  # the probe may already be compiled in this process
    try:
        with no_cxx, pytest.raises(UserError, match=r"hardware\.compile=true: torch\.compile does not work on cpu "
                                                    r"here: InvalidCxxCompiler: .*hardware\.compile=false"):
            check_compile_available(torch.device("cpu"))
    finally:
        cpp_compiler_search.cache_clear()
        torch._dynamo.reset()


def max_rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def train_step(decoder: nn.Module, length: int, batch: int = 2) -> dict:
    """Output and gradients of one forward + backward (fp32)."""
    decoder.train()
    decoder.zero_grad()
    out = decoder(**decoder_inputs(length, batch))
    out.pow(2).mean().backward()
    return {"out": out.detach()} | {n: p.grad for n, p in decoder.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_compiled_decoder_matches_eager_in_training_validation_and_with_checkpointing():
    eager = lora_decoder()
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled) == 2
    counters.clear()
    for length, checkpointing in [(40, 0), (44, 0), (30, 1), (48, 1)]:  # new lengths; recompute through the graph
        eager.base_model.model.gradient_checkpointing = compiled.base_model.model.gradient_checkpointing = checkpointing
        want, got = train_step(eager, length), train_step(compiled, length)
        assert got.keys() == want.keys() and len(want) == 1 + 2 * 16  # output + A and B of 16 LoRA'd projections
        for name in want:
            assert max_rel_diff(got[name], want[name]) < 1e-5, (length, name)
    eager.eval(), compiled.eval()
    with torch.no_grad():  # validation: eval mode, no autograd graph
        for length in (40, 36):
            assert max_rel_diff(compiled(**decoder_inputs(length)), eager(**decoder_inputs(length))) < 1e-5
    # dynamic shapes from the first compile: new lengths and checkpointing reuse the graphs; one graph per variant
    # (sliding-window layer with a mask tensor / full layer with None) x (training / validation)
    assert counters["stats"]["unique_graphs"] == 4
    assert sum(counters["graph_break"].values()) == 0  # each layer is one graph
