"""PEFT adapter files <-> ComfyUI's adapter layout for ACE-Step 1.5, so that strength 1.0 in ComfyUI is the trained
update exactly.

Why: a PEFT file has no per-module `.alpha`, so ComfyUI scales a LoRA by 1.0 where PEFT scales by alpha/r (r=16,
alpha=32 plays at half strength). The layout written here, one module per decoder Linear:

    diffusion_model.decoder.<module>.lora_down.weight, .lora_up.weight, .alpha [, .dora_scale]   LoRA / rsLoRA / DoRA
    diffusion_model.decoder.<module>.lokr_w1 | lokr_w1_a + _b, lokr_w2 | lokr_w2_a + _b, .alpha    LoKr
    diffusion_model.decoder.<module>.hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, .alpha          LoHa

`.alpha` (float32) is chosen per module so that ComfyUI's scale equals PEFT's; the trained tensors are stored as they
are (same dtype), and the source adapter_config.json (+ DoRA magnitudes) rides in the safetensors metadata, so the
way back is bit-exact. `python scripts/convert_adapter.py --to comfyui|peft IN OUT [--base CHECKPOINT]`.

Rules as read in the sources (ComfyUI master, PEFT 0.21):
- ComfyUI comfy/lora.py model_lora_keys_unet: every `diffusion_model.<k>.weight` is reachable as `diffusion_model.<k>`
  and `lora_unet_<k, dots as _>`; the ACEStep15 branch adds `base_model.model.<decoder path>` and
  `lycoris_<decoder path, dots as _>`. load_lora reads `<x>.alpha` (.item()) and `<x>.dora_scale` and warns
  "lora key not loaded" for every key no adapter claimed. comfy/lora_convert.py renames no ACE-Step keys.
- ComfyUI comfy/weight_adapter/lora.py: `<x>.lora_up.weight` / `.lora_down.weight` (or `.lora_B.weight` /
  `.lora_A.weight`); calculate_weight: scale = alpha / lora_down.shape[0] if alpha else 1.0; W += s * up @ down.
- comfy/weight_adapter/lokr.py: diff = kron(w1, w2) (w1 = w1_a @ w1_b, w2 = w2_a @ w2_b where decomposed);
  scale = alpha / dim, dim = w2_b.shape[0] if w2 is decomposed, else w1_b.shape[0] if w1 is; both factors full:
  dim is None and the scale is 1.0 whatever alpha says.
- comfy/weight_adapter/loha.py: diff = (w1_a @ w1_b) * (w2_a @ w2_b), scale = alpha / w1_b.shape[0].
- comfy/weight_adapter/base.py weight_decompose (DoRA): Wc = W + s * diff; if dora_scale.shape[0] == W.shape[0]
  (wd_on_output) the norm is the row norm of the ORIGINAL W, else the column norm of Wc; W' = Wc * dora_scale /
  (norm + eps), eps = finfo(compute dtype).eps (comfy/model_management.py lora_compute_dtype: fp16 or fp32).
- PEFT peft/tuners/lora/layer.py LoraLayer.update_layer: scaling = lora_alpha / r (use_rslora: / sqrt(r));
  lora/model.py _create_and_replace: per-module r and alpha from rank_pattern / alpha_pattern (get_pattern_key).
- PEFT lora/dora.py get_weight_norm + lora/variants.py DoraLinearVariant.merge_safe: W' = m / ||W + s B A||_row *
  (W + s B A), m = lora_magnitude_vector [out], no eps.
- PEFT lokr/layer.py: scaling = alpha / r, delta = kron(w1, w2) * scaling; w1 full unless decompose_both and
  r < max(out_l, in_m) / 2, w2 full unless r < max(out_k, in_n) / 2, factors from factorization(dim, decompose_factor).
- PEFT loha/layer.py: scaling = alpha / r, delta = (w1_a @ w1_b) * (w2_a @ w2_b) * scaling.

Hence: alpha_comfy = PEFT scale * dim (= lora_alpha for plain LoRA / LoHa / decomposed LoKr, lora_alpha * sqrt(r) for
rsLoRA). LoKr with both factors full and a scale != 1: ComfyUI would ignore alpha, so w1 goes out as lokr_w1_a = w1,
lokr_w1_b = identity (dim = w1's columns), which makes ComfyUI apply alpha while w1 stays bit-exact (baking the scale
into w1 would not come back bit for bit). DoRA: ComfyUI divides by the BASE weight's row norm, PEFT by that of
W + dW, so dora_scale = m * (||W||_row + eps) / ||W + s B A||_row needs the base decoder weights (`base`) and is
tied to that checkpoint; eps is fp32's (where ComfyUI patches in fp16, fp16 rounding dominates anyway).
Not representable (ValueError): input-axis dora_scale ([1, in], LyCORIS wd_on_output=False), Tucker / conv factors
(lora_mid, lokr_t2, hada_t1/t2), DoRA on LoKr / LoHa, a file mixing types or DoRA and plain modules, PEFT lora_bias /
fan_in_fan_out, other PEFT types (ComfyUI's OFT / BOFT / GLoRA have no PEFT twin here).
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch
from peft.tuners.lokr.layer import factorization
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import load as st_load, load_file, save as st_save, save_file

from acestep_ft.atomic import atomic_directory, atomic_write_bytes

Tensor = torch.Tensor
Modules = Dict[str, Dict[str, Tensor]]  # decoder module path -> {tensor name (PEFT spelling): tensor}
Base = Optional[Mapping[str, Tensor]]  # decoder state dict "<module>.weight" of the checkpoint trained on (DoRA)
COMFY_PREFIX = "diffusion_model.decoder."
CONFIG_KEY = "acestep_ft.peft_config"  # metadata: the source adapter_config.json, as JSON
MAGNITUDE_KEY = "acestep_ft.dora_magnitude"  # metadata: DoRA magnitudes {module: [out]} as base64 safetensors bytes
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
DORA_EPS = torch.finfo(torch.float32).eps  # ComfyUI's eps when it patches in fp32
_FACTORS = r"lokr_w[12](?:_[ab])?|hada_w[12]_[ab]"  # spelled the same in PEFT and ComfyUI
_PEFT_KEY = re.compile(r"^base_model\.model\.(.+?)\."
                       rf"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?|{_FACTORS})$")
_COMFY_KEY = re.compile(r"^(diffusion_model\.decoder\.|base_model\.model\.|lycoris_|lora_unet_decoder_)(.+?)\."
                        r"(lora_up\.weight|lora_down\.weight|lora_B\.weight|lora_A\.weight|alpha|dora_scale|"
                        rf"{_FACTORS})$")
_TO_PEFT = {"lora_up.weight": "lora_B.weight", "lora_down.weight": "lora_A.weight",
            "lora_magnitude_vector.weight": "lora_magnitude_vector"}
_TO_COMFY = {"lora_B.weight": "lora_up.weight", "lora_A.weight": "lora_down.weight"}
_NOT_FACTORS = ("alpha", "dora_scale", "lora_magnitude_vector")
# (left, right) factor pairs whose product is [rows, cols]; the shared size is the rank
_PAIRS = {"LORA": [("lora_B.weight", "lora_A.weight")],
          "LOHA": [("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")],
          "LOKR": [("lokr_w1_a", "lokr_w1_b"), ("lokr_w2_a", "lokr_w2_b")]}
# Words of the decoder's module paths: underscored names (lycoris_..., lora_unet_...) are split back into dotted paths
# by longest match, and any module path made of other words is refused (tests: every decoder weight path survives).
_ATOMS = sorted(["layers", "self_attn", "cross_attn", "mlp", "self_attn_norm", "cross_attn_norm", "mlp_norm", "q_proj",
                 "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "gate_proj", "up_proj", "down_proj", "norm_out",
                 "condition_embedder", "proj_in", "proj_out", "time_embed", "time_embed_r", "linear_1", "linear_2",
                 "time_proj"], key=len, reverse=True)
_ATOM = re.compile(r"(" + "|".join(_ATOMS) + r"|\d+)(?:_|$)")


def dotted(name: str) -> Optional[str]:
    """"layers_0_self_attn_q_proj" -> "layers.0.self_attn.q_proj"; None if it is no ACE-Step decoder path."""
    parts, pos = [], 0
    while pos < len(name):
        m = _ATOM.match(name, pos)
        if m is None:
            return None
        parts.append(m.group(1))
        pos = m.end()
    return ".".join(parts)


def _group(weights: Mapping[str, Tensor], comfy: bool) -> Tuple[Modules, Dict[str, str]]:
    """Tensors by module, names in PEFT spelling (+ "alpha", "dora_scale"); and each module's first key (messages)."""
    modules: Modules = {}
    first: Dict[str, str] = {}
    for key in sorted(weights):
        m = (_COMFY_KEY if comfy else _PEFT_KEY).match(key)
        prefix, module, name = (m.groups() if comfy else ("", *m.groups())) if m else ("", None, None)
        if prefix in ("lycoris_", "lora_unet_decoder_"):
            module = dotted(module)
        if not module or dotted(module.replace(".", "_")) != module:
            where = ("diffusion_model.decoder.<module>.lora_up.weight | .lora_down.weight | .alpha | .dora_scale | "
                     ".lokr_* | .hada_*, or the base_model.model. / lycoris_ / lora_unet_ spellings" if comfy else
                     "base_model.model.<module>.lora_A.weight | .lora_B.weight | .lora_magnitude_vector | .lokr_* | "
                     ".hada_*")
            raise ValueError(f"{key}: no key of a LoRA / DoRA / LoKr / LoHa adapter on an ACE-Step 1.5 decoder Linear "
                             f"that this converter maps (expected {where})")
        name = _TO_PEFT.get(name, name)
        if name in modules.setdefault(module, {}):
            raise ValueError(f"{key}: module {module} already has its {name} under another spelling")
        modules[module][name] = weights[key]
        first.setdefault(module, key)
    return modules, first


def _kind(t: Dict[str, Tensor], key: str) -> str:
    """LORA / LOKR / LOHA from a module's tensor names; ValueError if incomplete or mixed."""
    kinds = {"LOKR" if n.startswith("lokr_") else "LOHA" if n.startswith("hada_") else "LORA"
             for n in t if n not in _NOT_FACTORS}
    kind = kinds.pop() if len(kinds) == 1 else None
    names = set(t)
    complete = {"LORA": {"lora_A.weight", "lora_B.weight"} <= names,
                "LOHA": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= names,  # w_i = full or a @ b, i = 1, 2
                "LOKR": all((f"lokr_w{i}" in t) != ({f"lokr_w{i}_a", f"lokr_w{i}_b"} <= names) for i in "12")}
    if not complete.get(kind):
        raise ValueError(f"{key}: its module has an incomplete or mixed set of adapter tensors {sorted(t)}")
    return kind


def _dim(kind: str, t: Dict[str, Tensor], key: str) -> Optional[int]:
    """ComfyUI's divisor of alpha, read off the shapes (None: LoKr with both factors full, alpha ignored), after
    checking that the factors fit together."""
    pairs = [(t[a], t[b]) for a, b in _PAIRS[kind] if a in t]
    mag = t.get("lora_magnitude_vector")
    fits = all(x.ndim == 2 for n, x in t.items() if n not in _NOT_FACTORS) and \
        all(a.shape[1] == b.shape[0] for a, b in pairs)
    if fits and kind != "LOKR":  # LoRA / LoHa: one rank, products all [out, in], DoRA's magnitude [out]
        fits = len({(a.shape[0], a.shape[1], b.shape[1]) for a, b in pairs}) == 1 and \
            (mag is None or tuple(mag.shape) == pairs[0][0].shape[:1])
    if not fits:
        raise ValueError(f"{key}: inconsistent shapes in its module: "
                         + ", ".join(f"{n} {list(x.shape)}" for n, x in sorted(t.items())))
    if kind == "LOKR":  # ComfyUI: w2's rank wins over w1's
        return next((t[n].shape[0] for n in ("lokr_w2_b", "lokr_w1_b") if n in t), None)
    return pairs[0][1].shape[0]


def _peft_type(config: Mapping) -> str:
    kind = str(config.get("peft_type", "")).upper()
    if kind not in ("LORA", "LOKR", "LOHA"):
        raise ValueError(f"peft_type {config.get('peft_type')!r}: the ComfyUI layout holds LORA (also rsLoRA, DoRA), "
                         "LOKR and LOHA adapters")
    if kind == "LORA" and (config.get("lora_bias") or config.get("fan_in_fan_out")):
        raise ValueError("lora_bias / fan_in_fan_out LoRA adapters have no ComfyUI form here")
    return kind


def _dora_norms(t: Dict[str, Tensor], scale: float, base: Mapping[str, Tensor], module: str) -> Tuple[Tensor, Tensor]:
    """(||W||_row + eps, ||W + s B A||_row) in float64: the DoRA denominators of ComfyUI and of PEFT."""
    shape = (t["lora_B.weight"].shape[0], t["lora_A.weight"].shape[1])
    w = base.get(f"{module}.weight")
    if w is None or tuple(w.shape) != shape:
        raise ValueError(f"the base weights have no {module}.weight of shape {list(shape)} (found "
                         f"{None if w is None else list(w.shape)}): give the checkpoint the adapter was trained on")
    w = w.double()
    delta = scale * (t["lora_B.weight"].double() @ t["lora_A.weight"].double())
    return w.norm(dim=1) + DORA_EPS, (w + delta).norm(dim=1)


def _to_comfy(modules: Modules, config: Mapping, base: Base, first: Dict[str, str]) -> Dict[str, Tensor]:
    """The ComfyUI tensors of `modules` (PEFT spelling) under `config`; dora_scale only where `base` is given."""
    kind, out = _peft_type(config), {}
    rslora, dora = kind == "LORA" and config.get("use_rslora"), kind == "LORA" and bool(config.get("use_dora"))
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    targets = config.get("target_modules") or []
    for module, t in sorted(modules.items()):
        key, t = first[module], dict(t)
        if _kind(t, key) != kind or ("lora_magnitude_vector" in t) != dora:
            raise ValueError(f"{key}: the adapter config says {kind}{' with DoRA' if dora else ''}, this module has "
                             f"{sorted(t)}")
        if not (targets == "all-linear" or (re.fullmatch(targets, module) if isinstance(targets, str) else
                                            any(module == x or module.endswith("." + x) for x in targets))):
            raise ValueError(f"{key}: module {module} is not in the adapter config's target_modules {targets}")
        # per-module r and alpha resolved as PEFT does (lora/lokr/loha model.py _create_and_replace)
        r = ranks.get(get_pattern_key(ranks.keys(), module), config["r"])
        a = alphas.get(get_pattern_key(alphas.keys(), module), config["lora_alpha" if kind == "LORA" else "alpha"])
        scale = a / math.sqrt(r) if rslora else a / r
        dim = _dim(kind, t, key)
        inner = {t[n].shape[0] for n in ("lora_A.weight", "hada_w1_b", "lokr_w1_b", "lokr_w2_b") if n in t}
        if inner - {r}:
            raise ValueError(f"{key}: rank {sorted(inner)} but the adapter config gives r={r} for {module}")
        magnitude = t.pop("lora_magnitude_vector", None)
        if kind == "LOKR" and dim is None and scale != 1.0:
            # Both factors full: ComfyUI would ignore alpha. Written as w1 @ I, ComfyUI divides alpha by I's size,
            # and w1 itself stays bit-exact (a scale baked into w1 would not come back bit for bit).
            w1 = t.pop("lokr_w1")
            t["lokr_w1_a"], t["lokr_w1_b"], dim = w1, torch.eye(w1.shape[1], dtype=w1.dtype), w1.shape[1]
        p = f"{COMFY_PREFIX}{module}."
        out.update({p + _TO_COMFY.get(n, n): x for n, x in t.items()})
        if dim is not None:  # alpha / dim = PEFT's scale; alpha itself where ComfyUI divides by r as PEFT does
            out[p + "alpha"] = torch.tensor(float(a if dim == r and not rslora else scale * dim), dtype=torch.float32)
        if magnitude is not None and base is not None:  # on the output axis: shape [out, 1]
            w_norm, wc_norm = _dora_norms(t, scale, base, module)
            out[p + "dora_scale"] = (magnitude.double() * w_norm / wc_norm).to(magnitude.dtype).unsqueeze(1)
    return out


def to_comfyui(weights: Dict[str, Tensor], adapter_config: dict, base: Base = None) -> Dict[str, Tensor]:
    """PEFT adapter state dict (adapter_model.safetensors keys) + its adapter_config.json -> ComfyUI layout in which
    strength 1.0 is PEFT's update. DoRA needs `base`: the decoder weights it was trained on ("<module>.weight")."""
    modules, first = _group(weights, comfy=False)
    if _peft_type(adapter_config) == "LORA" and adapter_config.get("use_dora") and base is None:
        raise ValueError("a DoRA adapter needs the base decoder weights (ComfyUI's dora_scale is relative to the base "
                         "weight's row norm): pass base= / --base CHECKPOINT")
    return _to_comfy(modules, adapter_config, base, first)


def comfyui_metadata(weights: Dict[str, Tensor], adapter_config: dict) -> Dict[str, str]:
    """safetensors metadata that makes the way back exact: the adapter config and DoRA's magnitude vectors."""
    meta = {"format": "pt", CONFIG_KEY: json.dumps(adapter_config, sort_keys=True)}
    mags = {m: t["lora_magnitude_vector"].contiguous() for m, t in _group(weights, comfy=False)[0].items()
            if "lora_magnitude_vector" in t}
    if mags:
        meta[MAGNITUDE_KEY] = base64.b64encode(st_save(mags)).decode("ascii")
    return meta


def _lokr_layout(modules: Modules, first: Dict[str, str]) -> Tuple[bool, int, Dict[str, int]]:
    """(decompose_both, decompose_factor, r per module) with which PEFT's LoKr rebuilds exactly these factors
    (lokr/layer.py update_layer: w1 [a, c], w2 [b, d], out = a*b and in = c*d factorised by decompose_factor)."""
    def size(t, i):
        w = f"lokr_w{i}"
        return tuple(t[w].shape) if w in t else (t[w + "_a"].shape[0], t[w + "_b"].shape[1])
    shapes = {m: (*size(t, 1), *size(t, 2)) for m, t in modules.items()}  # (a, c, b, d)
    both = any("lokr_w1_b" in t for t in modules.values())
    factor = next((f for f in [-1] + sorted({s[0] for s in shapes.values()})
                   if all(factorization(a * b, f) == (a, b) and factorization(c * d, f) == (c, d)
                          for a, c, b, d in shapes.values())), None)
    if factor is None:
        raise ValueError(f"{first[min(modules)]}: LoKr factor shapes that PEFT's factorization (decompose_factor) "
                         "cannot rebuild")
    ranks = {}
    for m, (a, c, b, d) in shapes.items():
        t = modules[m]
        inner = {t[n].shape[0] for n in ("lokr_w1_b", "lokr_w2_b") if n in t}
        r = inner.pop() if len(inner) == 1 else math.ceil(max(b, d, *((a, c) if both else ())) / 2)
        w1_split, w2_split = both and r < max(a, c) / 2, r < max(b, d) / 2  # PEFT's use_w1 / use_w2, negated
        if inner or w1_split != ("lokr_w1_b" in t) or w2_split != ("lokr_w2_b" in t):
            raise ValueError(f"{first[m]}: LoKr factors {[f'{n} {list(x.shape)}' for n, x in sorted(t.items())]} "
                             "that PEFT's LoKr (one r, decompose_both) cannot rebuild")
        ranks[m] = r
    return both, factor, ranks


def _num(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _config(kind: str, ranks: Dict[str, int], alphas: Dict[str, float], extra: dict) -> dict:
    """A PEFT config dict: the most common r / alpha, the others as rank_pattern / alpha_pattern (full module paths)."""
    r0, a0 = (Counter(d.values()).most_common(1)[0][0] for d in (ranks, alphas))
    return {"peft_type": kind, "task_type": "FEATURE_EXTRACTION", "target_modules": sorted(ranks), "r": r0,
            "lora_alpha" if kind == "LORA" else "alpha": _num(a0), **extra,
            "rank_pattern": {m: r for m, r in ranks.items() if r != r0},
            "alpha_pattern": {m: _num(a) for m, a in alphas.items() if a != a0}}


def _module_to_peft(kind: str, t: Dict[str, Tensor], key: str, module: str, magnitudes: Mapping[str, Tensor],
                    base: Base) -> Tuple[Dict[str, Tensor], Optional[int], Optional[float], float]:
    """One module: (PEFT tensors, ComfyUI's alpha divisor, alpha, the scale ComfyUI applies)."""
    t = dict(t)
    alpha, dora_scale = t.pop("alpha", None), t.pop("dora_scale", None)
    alpha, dim = (None if alpha is None else alpha.item()), _dim(kind, t, key)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0  # ComfyUI's rule
    if kind == "LOKR" and "lokr_w2" in t and "lokr_w1_b" in t and torch.equal(
            t["lokr_w1_b"], torch.eye(t["lokr_w1_a"].shape[1], dtype=t["lokr_w1_b"].dtype)):
        t["lokr_w1"] = t.pop("lokr_w1_a")  # our form of both factors full (see _to_comfy): w1 @ I = w1
        del t["lokr_w1_b"]
    if dora_scale is not None:
        out = t["lora_B.weight"].shape[0] if kind == "LORA" else None
        if tuple(dora_scale.shape) != (out, 1):
            raise ValueError(f"{key}: dora_scale {list(dora_scale.shape)} on a {kind} module: PEFT's DoRA is a LoRA "
                             "with one magnitude per output row (ComfyUI's dora_scale [out, 1])")
        if module in magnitudes:
            t["lora_magnitude_vector"] = magnitudes[module]
        elif base is None:
            raise ValueError(f"{key}: DoRA needs the base decoder weights to turn ComfyUI's dora_scale (relative to "
                             "the base weight's row norm) into PEFT's magnitude: pass base= / --base CHECKPOINT")
        else:
            w_norm, wc_norm = _dora_norms(t, scale, base, module)
            t["lora_magnitude_vector"] = (dora_scale[:, 0].double() * wc_norm / w_norm).to(dora_scale.dtype)
    return t, dim, alpha, scale


def from_comfyui(weights: Dict[str, Tensor], metadata: Optional[Mapping[str, str]] = None,
                 base: Base = None) -> Tuple[Dict[str, Tensor], dict]:
    """ComfyUI-layout adapter (also base_model.model. / lycoris_ / lora_unet_ keys, lora_B / lora_A names) ->
    (PEFT state dict, adapter_config dict) whose update is what ComfyUI applies at strength 1.0. `metadata` as
    `write_comfyui` wrote it restores the original config (checked against the tensors); DoRA without it needs
    `base`."""
    modules, first = _group(weights, comfy=True)
    if not modules:
        raise ValueError("no adapter tensors found")
    kinds = {m: (_kind(t, first[m]), "dora_scale" in t) for m, t in modules.items()}
    odd = [m for m in sorted(modules) if kinds[m] != kinds[min(modules)]]
    if odd:
        raise ValueError(f"{first[odd[0]]}: a PEFT adapter has one type, with DoRA on all modules or none; this file "
                         f"mixes {sorted(set(kinds.values()))} (type, DoRA)")
    kind, meta = kinds[min(modules)][0], dict(metadata or {})
    magnitudes = st_load(base64.b64decode(meta[MAGNITUDE_KEY])) if MAGNITUDE_KEY in meta else {}
    parts = {m: _module_to_peft(kind, t, first[m], m, magnitudes, base) for m, t in modules.items()}
    peft_modules = {m: p[0] for m, p in parts.items()}
    peft = {f"base_model.model.{m}.{n}": x for m, t in peft_modules.items() for n, x in t.items()}
    if CONFIG_KEY in meta:  # our own file: its original config, provided the tensors still say the same
        config = json.loads(meta[CONFIG_KEY])
        canonical = {f"{COMFY_PREFIX}{m}.{_TO_COMFY.get(n, n)}": x for m, t in modules.items() for n, x in t.items()}
        again = _to_comfy(peft_modules, config, base, first)
        for key in sorted(set(canonical) | set(again)):
            a, b = canonical.get(key), again.get(key)
            if key.endswith(".dora_scale") and base is None:
                continue
            if a is None or b is None or a.dtype != b.dtype or not torch.equal(a, b):
                raise ValueError(f"{key}: differs from what the adapter config in this file's metadata ({CONFIG_KEY}) "
                                 "gives (edited after export, or another base checkpoint): convert without the "
                                 "metadata (--ignore-metadata) to derive the config from the tensors")
        return peft, config
    if kind == "LOKR":
        both, factor, ranks = _lokr_layout(peft_modules, first)
        extra = {"decompose_both": both, "decompose_factor": factor}
    else:
        ranks = {m: p[1] for m, p in parts.items()}
        extra = {"use_dora": kinds[min(modules)][1], "use_rslora": False} if kind == "LORA" else {}
    # PEFT alpha = ComfyUI's scale * r; the file's alpha as it is where ComfyUI divides by r too (exact way back)
    alphas = {m: alpha if alpha is not None and dim == ranks[m] else scale * ranks[m]
              for m, (_, dim, alpha, scale) in parts.items()}
    return peft, _config(kind, ranks, alphas, extra)


def describe(comfy_weights: Dict[str, Tensor]) -> str:
    """"16 modules, LORA, rank 4, alpha 8, ComfyUI scale 2" (distinct values joined by /): what ComfyUI applies."""
    modules, first = _group(comfy_weights, comfy=True)
    rows = set()
    for m, t in modules.items():
        kind, alpha = _kind(t, first[m]), (t["alpha"].item() if "alpha" in t else None)
        dim = _dim(kind, t, first[m])
        rows.add((kind + ("+DoRA" if "dora_scale" in t else ""), "full" if dim is None else str(dim),
                  "none" if alpha is None else f"{alpha:g}", f"{alpha / dim if alpha is not None and dim else 1.0:g}"))
    col = lambda i: "/".join(sorted({row[i] for row in rows}))  # noqa: E731
    return f"{len(modules)} modules, {col(0)}, rank {col(1)}, alpha {col(2)}, ComfyUI scale {col(3)}"


def write_comfyui(peft_dir: Path, out_file: Path, base: Base = None) -> Dict[str, Tensor]:
    """A PEFT adapter directory -> one ComfyUI .safetensors (atomic; tensors keep their dtype). Returns its tensors."""
    peft_dir, out_file = Path(peft_dir), Path(out_file)
    config = json.loads((peft_dir / ADAPTER_CONFIG).read_text())
    weights = load_file(str(peft_dir / ADAPTER_WEIGHTS))
    tensors = to_comfyui(weights, config, base)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_file, st_save({k: v.contiguous() for k, v in tensors.items()},
                                         metadata=comfyui_metadata(weights, config)))
    return tensors


def write_peft(comfy_file: Path, out_dir: Path, base: Base = None,
               use_metadata: bool = True) -> Tuple[Dict[str, Tensor], dict]:
    """A ComfyUI-layout .safetensors -> a PEFT adapter directory (atomic: the old `out_dir` or the complete new one)."""
    with safe_open(str(comfy_file), "pt") as f:
        metadata = f.metadata() or {}
        weights = {k: f.get_tensor(k) for k in f.keys()}
    peft, config = from_comfyui(weights, metadata if use_metadata else None, base)
    with atomic_directory(out_dir) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous() for k, v in peft.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return peft, config
