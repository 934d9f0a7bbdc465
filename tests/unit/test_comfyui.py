"""ComfyUI adapter layout (train/comfyui.py): ComfyUI at strength 1.0 applies PEFT's trained update, checked with
ComfyUI's own rules re-implemented below from its source; round trips are lossless both ways; the CLI."""

import copy
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from acestep_ft.model import load_model
from acestep_ft.model.variants import build_meta_model
from acestep_ft.train.comfyui import (
    CONFIG_KEY, MAGNITUDE_KEY, describe, dotted, from_comfyui, to_comfyui, write_comfyui, write_peft,
)
from conftest import ROOT, model_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # self_attn and cross_attn: 16 modules on the tiny decoder
CASES = {
    "lora": LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
    "rslora": LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=TARGETS),
    "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS),
    "patterns": LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                           rank_pattern={"layers.0.self_attn.q_proj": 2, "k_proj": 8},
                           alpha_pattern={"layers.1.cross_attn.o_proj": 3, "v_proj": 16}),
    "lokr": LoKrConfig(r=2, alpha=8, target_modules=TARGETS),  # w1 full, w2 = w2_a @ w2_b
    "lokr_both": LoKrConfig(r=2, alpha=8, decompose_both=True, target_modules=TARGETS),
    "lokr_full": LoKrConfig(r=8, alpha=3, target_modules=TARGETS),  # both factors full: ComfyUI would ignore alpha
    "loha": LoHaConfig(r=4, alpha=8, target_modules=TARGETS),
}


def trained(kind, tmp_path, dtype=torch.float32):
    """(PEFT model, its saved adapter directory, the base decoder state dict): every adapter tensor random, as after
    training (no zero factor; DoRA magnitudes off the row norms)."""
    torch.manual_seed(0)
    decoder = load_model(model_config()).decoder
    base = {k: v.clone() for k, v in decoder.state_dict().items()}
    model = get_peft_model(decoder, copy.deepcopy(CASES[kind]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(p * (1 + 0.2 * noise) if "magnitude" in name else 0.2 * noise)
    model.to(dtype).save_pretrained(tmp_path / kind)
    return model, tmp_path / kind, base


def merged(model) -> dict:
    """PEFT's own merged decoder weights ("<module>.weight")."""
    return copy.deepcopy(model).merge_and_unload().state_dict()


# ---- ComfyUI's rules, re-implemented from its source (see the module docstring of train/comfyui.py) ----

def comfy_key_map(base) -> dict:
    """comfy/lora.py model_lora_keys_unet for an ACEStep15 model: LoRA-file prefix -> model weight key."""
    key_map = {}
    for k in base:
        if k.endswith(".weight"):
            path, model_key = k[:-len(".weight")], "diffusion_model.decoder." + k
            key_map["lora_unet_" + ("decoder." + path).replace(".", "_")] = model_key  # generic
            key_map["diffusion_model.decoder." + path] = model_key  # generic "without any weird key names"
            key_map["base_model.model." + path] = model_key  # ACEStep15 branch
            key_map["lycoris_" + path.replace(".", "_")] = model_key  # ACEStep15 branch
    return key_map


def comfy_load(lora, key_map):
    """comfy/lora.py load_lora + weight_adapter/{lora,loha,lokr}.py load: (model key -> patch, keys not loaded)."""
    patches, loaded = {}, set()
    for x, target in key_map.items():
        def take(name):
            if f"{x}.{name}" in lora:
                loaded.add(f"{x}.{name}")
                return lora[f"{x}.{name}"]
        alpha = take("alpha")
        alpha, dora = (None if alpha is None else alpha.item()), take("dora_scale")
        for up, down in (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight")):
            if f"{x}.{up}" in lora:
                patches[target] = ("lora", (take(up), take(down)), alpha, dora)
                break
        if f"{x}.hada_w1_a" in lora:
            patches[target] = ("loha", tuple(take(n) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
                               alpha, dora)
        lokr = {n: take(n) for n in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")}
        if any(lokr[n] is not None for n in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a")):
            patches[target] = ("lokr", lokr, alpha, dora)
    return patches, set(lora) - loaded  # ComfyUI logs "lora key not loaded" for each of the latter


def comfy_weight(weight, patch, strength=1.0):
    """calculate_weight of weight_adapter/{lora,loha,lokr}.py and base.py weight_decompose, float32, no offset."""
    kind, t, alpha_value, dora_scale = patch
    f = [None if x is None else x.float() for x in (t if kind != "lokr" else ())]
    if kind == "lora":
        alpha = alpha_value / f[1].shape[0] if alpha_value is not None else 1.0
        diff = f[0] @ f[1]
    elif kind == "loha":
        alpha = alpha_value / f[1].shape[0] if alpha_value is not None else 1.0
        diff = (f[0] @ f[1]) * (f[2] @ f[3])
    else:
        t, dim = {n: None if x is None else x.float() for n, x in t.items()}, None
        w1 = t["lokr_w1"]
        if w1 is None:
            dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"]
        if w2 is None:
            dim, w2 = t["lokr_w2_b"].shape[0], t["lokr_w2_a"] @ t["lokr_w2_b"]
        alpha = alpha_value / dim if alpha_value is not None and dim is not None else 1.0
        diff = torch.kron(w1, w2)
    weight = weight.float().clone()
    if dora_scale is None:
        return weight + strength * alpha * diff.reshape(weight.shape)
    weight_calc = weight + alpha * diff.reshape(weight.shape)
    if dora_scale.shape[0] == weight_calc.shape[0]:  # wd_on_output: the ORIGINAL weight's row norm
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
    else:
        norm = weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True).transpose(0, 1)
    weight_calc = weight_calc * (dora_scale.float() / (norm + torch.finfo(weight.dtype).eps))
    return weight + strength * (weight_calc - weight)


def comfy_apply(lora, base) -> dict:
    """The decoder weights ComfyUI would run at strength 1.0 ("<module>.weight" -> tensor), only the patched ones."""
    patches, not_loaded = comfy_load(lora, comfy_key_map(base))
    assert not not_loaded, f"ComfyUI would ignore {sorted(not_loaded)[:3]}"
    return {k[len("diffusion_model.decoder."):]: comfy_weight(base[k[len("diffusion_model.decoder."):]], p)
            for k, p in patches.items()}


# ---- tests ----

@pytest.mark.parametrize("kind", list(CASES))
def test_comfyui_at_strength_one_applies_the_trained_update(kind, tmp_path):
    model, adapter, base = trained(kind, tmp_path)
    comfy = to_comfyui(load_file(str(adapter / "adapter_model.safetensors")),
                       json.loads((adapter / "adapter_config.json").read_text()), base)
    assert all(k.startswith("diffusion_model.decoder.") for k in comfy)
    patched, expected = comfy_apply(comfy, base), merged(model)
    assert len(patched) == 16 and all(k in base for k in patched)  # every key maps onto an existing decoder weight
    for name, weight in patched.items():
        assert not torch.allclose(weight, base[name], atol=1e-3), name  # a real update
        torch.testing.assert_close(weight, expected[name], atol=1e-5, rtol=1e-5, msg=name)


def test_describe_says_what_comfyui_applies_per_module(tmp_path):
    model, adapter, base = trained("patterns", tmp_path)
    comfy = to_comfyui(load_file(str(adapter / "adapter_model.safetensors")),
                       json.loads((adapter / "adapter_config.json").read_text()))
    # r=2 alpha 8 (q_proj of layer 0), r=8 alpha 8 (k_proj), r=4 alpha 16 (v_proj), 3 (one o_proj), 8 (the rest)
    assert describe(comfy) == "16 modules, LORA, rank 2/4/8, alpha 16/3/8, ComfyUI scale 0.75/1/2/4"


def test_plain_peft_file_plays_at_r_over_alpha_in_comfyui_and_the_converted_one_at_one(tmp_path):
    """The reported bug: without `.alpha` ComfyUI scales by 1.0 instead of alpha/r (here 0.5 of the update)."""
    model, adapter, base = trained("lora", tmp_path)
    raw = load_file(str(adapter / "adapter_model.safetensors"))
    fixed = to_comfyui(raw, json.loads((adapter / "adapter_config.json").read_text()))
    expected = merged(model)
    for lora, ratio in ((raw, 4 / 8), (fixed, 1.0)):  # r / alpha, then 1
        for name, weight in comfy_apply(lora, base).items():
            got = (weight - base[name]).flatten() @ (expected[name] - base[name]).flatten()
            assert got / (expected[name] - base[name]).pow(2).sum() == pytest.approx(ratio, rel=1e-5), name


@pytest.mark.parametrize("kind", list(CASES))
def test_peft_to_comfyui_to_peft_is_bit_identical(kind, tmp_path):
    model, adapter, base = trained(kind, tmp_path)
    write_comfyui(adapter, tmp_path / "c.safetensors", base)
    write_peft(tmp_path / "c.safetensors", tmp_path / "back")  # metadata: no base needed, even for DoRA
    original, back = (load_file(str(d / "adapter_model.safetensors")) for d in (adapter, tmp_path / "back"))
    assert set(back) == set(original)
    assert all(back[k].dtype == original[k].dtype and torch.equal(back[k], original[k]) for k in original)
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text()) == \
        json.loads((adapter / "adapter_config.json").read_text())


@pytest.mark.parametrize("kind", list(CASES))
def test_config_derived_from_the_tensors_alone_builds_the_same_adapter(kind, tmp_path):
    """Without our metadata (a file from elsewhere): PEFT's LoraConfig / LoKrConfig / LoHaConfig accepts the derived
    config, loads the tensors strictly, and merges to the same weights."""
    model, adapter, base = trained(kind, tmp_path)
    comfy = to_comfyui(load_file(str(adapter / "adapter_model.safetensors")),
                       json.loads((adapter / "adapter_config.json").read_text()), base)
    peft, config = from_comfyui(comfy, base=base)
    assert config["task_type"] == "FEATURE_EXTRACTION" and len(config["target_modules"]) == 16
    (tmp_path / "derived").mkdir()
    (tmp_path / "derived" / "adapter_config.json").write_text(json.dumps(config))
    save_file(peft, str(tmp_path / "derived" / "adapter_model.safetensors"))
    torch.manual_seed(0)
    fresh = PeftModel.from_pretrained(load_model(model_config()).decoder, str(tmp_path / "derived"))
    loaded = get_peft_model_state_dict(fresh)  # PEFT rebuilt exactly these tensors (names, shapes) and loaded them
    assert set(loaded) == set(peft) and all(torch.equal(loaded[k], peft[k]) for k in peft)
    expected, got = merged(model), merged(fresh)
    for name in comfy_apply(comfy, base):
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("spelling", ["diffusion_model", "base_model", "lycoris"])
def test_comfyui_to_peft_to_comfyui_gives_the_same_tensors(kind, spelling, tmp_path):
    model, adapter, base = trained(kind, tmp_path)
    comfy = to_comfyui(load_file(str(adapter / "adapter_model.safetensors")),
                       json.loads((adapter / "adapter_config.json").read_text()), base)
    foreign = {respell(k, spelling): v for k, v in comfy.items()}  # as Side-Step / LyCORIS exports name them
    assert comfy_apply(foreign, base).keys() == comfy_apply(comfy, base).keys()  # ComfyUI reads them all
    again = to_comfyui(*from_comfyui(foreign, base=base), base)
    assert set(again) == set(comfy)
    for key, tensor in comfy.items():
        assert again[key].dtype == tensor.dtype, key
        if key.endswith(".dora_scale"):  # through PEFT's magnitude and back: float64 math, not bit-exact
            torch.testing.assert_close(again[key], tensor, atol=0, rtol=1e-6)
        else:
            assert torch.equal(again[key], tensor), key


def respell(key, spelling):
    module, name = key[len("diffusion_model.decoder."):].rsplit(".", 1)
    if name == "weight":
        module, name = module.rsplit(".", 1)[0], module.rsplit(".", 1)[1] + ".weight"
    return {"diffusion_model": key, "base_model": f"base_model.model.{module}.{name}",
            "lycoris": f"lycoris_{module.replace('.', '_')}.{name}"}[spelling]


@pytest.mark.parametrize("variant", ["tiny", "acestep15_turbo", "acestep15_xl_base"])
def test_underscored_names_map_back_to_every_decoder_weight(variant):
    paths = [k[:-len(".weight")] for k in build_meta_model(model_config(variant)).decoder.state_dict()
             if k.endswith(".weight")]
    assert paths and all(dotted(p.replace(".", "_")) == p for p in paths)
    assert dotted("layers_0_self_attn_qq_proj") is None


def test_dtype_is_kept(tmp_path):
    model, adapter, base = trained("lora", tmp_path, dtype=torch.bfloat16)
    comfy = write_comfyui(adapter, tmp_path / "c.safetensors")
    assert {v.dtype for k, v in comfy.items() if not k.endswith(".alpha")} == {torch.bfloat16}
    assert {v.dtype for k, v in comfy.items() if k.endswith(".alpha")} == {torch.float32}
    peft, _ = write_peft(tmp_path / "c.safetensors", tmp_path / "back")
    assert {v.dtype for v in peft.values()} == {torch.bfloat16}


def test_bad_inputs_are_refused_naming_the_key(tmp_path):
    model, adapter, base = trained("lora", tmp_path)
    comfy = to_comfyui(load_file(str(adapter / "adapter_model.safetensors")),
                       json.loads((adapter / "adapter_config.json").read_text()))
    with pytest.raises(ValueError, match=r"diffusion_model\.decoder\.layers\.0\.self_attn\.q_proj\.lora_mid\.weight"):
        from_comfyui({**comfy, "diffusion_model.decoder.layers.0.self_attn.q_proj.lora_mid.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"lycoris_transformer_blocks_0_attn\.lokr_w1"):
        from_comfyui({"lycoris_transformer_blocks_0_attn.lokr_w1": torch.zeros(2, 2)})
    bad = dict(comfy)
    bad["diffusion_model.decoder.layers.0.self_attn.q_proj.lora_up.weight"] = torch.zeros(64, 3)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        from_comfyui(bad)
    config = json.loads((adapter / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="needs the base decoder weights"):
        to_comfyui(load_file(str(trained("dora", tmp_path)[1] / "adapter_model.safetensors")),
                   {**config, "use_dora": True})
    with pytest.raises(ValueError, match="peft_type 'IA3'"):
        to_comfyui(load_file(str(adapter / "adapter_model.safetensors")), {**config, "peft_type": "IA3"})
    with pytest.raises(ValueError, match=r"rank \[4\] but the adapter config gives r=2"):
        to_comfyui(load_file(str(adapter / "adapter_model.safetensors")), {**config, "r": 2})


def test_metadata_that_no_longer_matches_the_tensors_is_refused(tmp_path):
    model, adapter, base = trained("lora", tmp_path)
    write_comfyui(adapter, tmp_path / "c.safetensors")
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert CONFIG_KEY in meta and MAGNITUDE_KEY not in meta
    tensors["diffusion_model.decoder.layers.1.self_attn.v_proj.alpha"] = torch.tensor(2.0)  # edited by hand
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj\.alpha: differs from"):
        from_comfyui(tensors, meta)
    _, config = from_comfyui(tensors)  # without the metadata: the tensors decide
    assert config["alpha_pattern"] == {"layers.1.self_attn.v_proj": 2}


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_adapter.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def cli_main(*args) -> int:
    """The script's main() in this process (cheap checks; the subprocess runs cost an import of peft each)."""
    spec = importlib.util.spec_from_file_location("convert_adapter", ROOT / "scripts" / "convert_adapter.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main(list(map(str, args)))
    return exit_info.value.code


@pytest.mark.slow  # three subprocesses (~40 s on 2 cores); CI runs it
def test_cli_converts_both_ways_and_refuses_an_unknown_key(tmp_path, capsys):
    model, adapter, base = trained("dora", tmp_path)  # DoRA: the base checkpoint comes in through --base
    save_file({f"decoder.{k}": v.contiguous() for k, v in base.items()}, str(tmp_path / "model.safetensors"))
    assert cli_main("--to", "comfyui", adapter, tmp_path / "c.safetensors") == 1
    assert "--base" in capsys.readouterr().err and not (tmp_path / "c.safetensors").exists()

    done = run_cli("--to", "comfyui", adapter, tmp_path / "c.safetensors", "--base", tmp_path / "model.safetensors")
    assert done.returncode == 0, done.stderr
    assert "16 modules, LORA+DoRA, rank 4, alpha 8, ComfyUI scale 2" in done.stdout
    expected = merged(model)
    for name, weight in comfy_apply(load_file(str(tmp_path / "c.safetensors")), base).items():
        torch.testing.assert_close(weight, expected[name], atol=1e-5, rtol=1e-5, msg=name)

    done = run_cli("--to", "peft", tmp_path / "c.safetensors", tmp_path / "back")
    assert done.returncode == 0, done.stderr
    assert "PEFT LORA): 16 modules, r=4, alpha=8" in done.stdout
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text()) == \
        json.loads((adapter / "adapter_config.json").read_text())
    assert cli_main("--to", "peft", tmp_path / "c.safetensors", tmp_path / "back") == 2  # exists, no --overwrite

    bad = load_file(str(tmp_path / "c.safetensors"))
    bad["diffusion_model.decoder.layers.0.self_attn.q_proj.hada_t1"] = torch.zeros(2, 2)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    done = run_cli("--to", "peft", tmp_path / "bad.safetensors", tmp_path / "out")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "diffusion_model.decoder.layers.0.self_attn.q_proj.hada_t1" in done.stderr
    assert not (tmp_path / "out").exists()
