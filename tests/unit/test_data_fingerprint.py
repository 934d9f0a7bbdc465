"""The preprocessing fingerprint: a deterministic, sensitive digest and a comparison that skips unknowns."""

import pytest
import torch

from acestep_ft.data import DataError
from acestep_ft.data.fingerprint import (PREPROCESS_SCHEMA_VERSION, compare_fingerprints, make_fingerprint,
                                         read_fingerprint, tensor_digest, write_fingerprint)


def state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"encoder.norm.weight": torch.randn(64, generator=g),
            "encoder.proj.weight": torch.randn(1024, 1024, generator=g),  # 4 MiB: hashed whole (under budget)
            "encoder.steps": torch.arange(5)}


def test_digest_is_deterministic_and_independent_of_order_and_float_dtype():
    a = state()
    assert tensor_digest(a) == tensor_digest(dict(reversed(list(a.items())))) == tensor_digest(state())
    assert len(tensor_digest(a)) == 16
    bf16 = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in a.items()}
    upcast = {k: (v.float() if v.is_floating_point() else v) for k, v in bf16.items()}
    assert tensor_digest(bf16) == tensor_digest(upcast)


@pytest.mark.parametrize("change", [
    lambda s: s["encoder.norm.weight"].__setitem__(3, 0.5),
    lambda s: s["encoder.proj.weight"].__setitem__((700, 3), 0.0),
    lambda s: s.update({"encoder.norm.bias": s.pop("encoder.norm.weight")}),
    lambda s: s.update({"encoder.proj.weight": s["encoder.proj.weight"].reshape(512, 2048)}),
    lambda s: s.pop("encoder.steps"),
])
def test_digest_sees_one_changed_value_name_or_shape(change):
    s = state()
    before = tensor_digest(s)
    change(s)
    assert tensor_digest(s) != before


def test_large_state_dicts_are_strided_and_still_sensitive():
    big = {"w": torch.zeros(40 * 2**20 // 4)}  # 40 MiB: hashed with a stride, the first element always included
    before = tensor_digest(big)
    big["w"][0] = 1.0
    assert tensor_digest(big) != before


def test_compare_reports_only_known_differences():
    data = make_fingerprint("turbo", "aaaa", None, "tttt", "unknown", {"max_duration": 240, "source": "pt"})
    assert data["schema_version"] == PREPROCESS_SCHEMA_VERSION and data["created_by"]
    assert compare_fingerprints(data, dict(data)) == []
    model = make_fingerprint("turbo", "aaaa", "vvvv", None, "kkkk", {"max_duration": 240})
    assert compare_fingerprints(data, model) == []  # vae / text encoder / tokenizer unknown on one side
    model = make_fingerprint("base", "bbbb", None, "tttt", None, {"max_duration": 120, "other": 1})
    problems = compare_fingerprints(data, model)
    assert len(problems) == 3
    assert any(p.startswith("model_variant: data has 'turbo', training has 'base'") and "Fix:" in p for p in problems)
    assert any(p.startswith("condition_encoder_digest") for p in problems)
    assert any(p.startswith("settings.max_duration") for p in problems)
    assert compare_fingerprints(make_fingerprint("unknown", None, None, None, None, {}), model) == []
    assert compare_fingerprints(None, model) == []


def test_write_and_read_fingerprint(tmp_path):
    assert read_fingerprint(tmp_path) is None
    fp = make_fingerprint("tiny", tensor_digest(state()), None, None, None, {"n": 1})
    write_fingerprint(tmp_path, fp)
    assert read_fingerprint(tmp_path) == fp and [p.name for p in tmp_path.iterdir()] == ["fingerprint.json"]
    (tmp_path / "fingerprint.json").write_text("{broken")
    with pytest.raises(DataError, match="fingerprint.json: is not valid JSON"):
        read_fingerprint(tmp_path)
