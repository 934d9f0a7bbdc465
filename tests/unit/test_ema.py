"""EMA of the trained weights: the average itself, warmup, interval, swapping in and out, state round trip."""

import pytest
import torch

from acestep_ft.config import EmaConfig
from acestep_ft.train.ema import Ema


def params():
    return [("a", torch.nn.Parameter(torch.zeros(3))), ("b", torch.nn.Parameter(torch.ones(2, 2)))]


def test_average_without_warmup_is_the_textbook_recursion():
    named = params()
    ema = Ema(named, EmaConfig(enabled=True, decay=0.9, warmup=False))
    expected = torch.zeros(3)
    for step, value in enumerate([1.0, 2.0, 3.0], start=1):
        named[0][1].data.fill_(value)
        ema.update(step)
        expected = 0.9 * expected + 0.1 * value
    assert torch.allclose(ema.shadow["a"], expected)


def test_warmup_and_interval():
    named = params()
    ema = Ema(named, EmaConfig(enabled=True, decay=0.999, warmup=True, every=2))
    assert ema.decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): the first update mostly takes the weights
    named[0][1].data.fill_(5.0)
    ema.update(1)  # not on the interval
    assert ema.updates == 0 and torch.equal(ema.shadow["a"], torch.zeros(3))
    ema.update(2)
    assert ema.updates == 1 and torch.allclose(ema.shadow["a"], torch.full((3,), 4.5))


def test_applied_swaps_in_and_restores_and_state_round_trips():
    named = params()
    ema = Ema(named, EmaConfig(enabled=True, decay=0.5, warmup=False, on_cpu=True))
    named[1][1].data.fill_(3.0)
    ema.update(1)  # shadow b = 0.5 * 1 + 0.5 * 3 = 2
    with ema.applied():
        assert torch.equal(named[1][1].data, torch.full((2, 2), 2.0))
    assert torch.equal(named[1][1].data, torch.full((2, 2), 3.0))
    other = Ema(params(), EmaConfig(enabled=True))
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and torch.equal(other.shadow["b"], ema.shadow["b"])
    with pytest.raises(ValueError, match="EMA state does not match"):
        Ema([("c", torch.nn.Parameter(torch.zeros(1)))], EmaConfig()).load_state_dict(ema.state_dict())
