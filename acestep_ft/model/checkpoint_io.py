"""Reading and writing full ACE-Step 1.5 checkpoints in the official layout.

Accepted inputs for `cfg.path`: an official DiT directory (`config.json` + `model.safetensors`, or
`model.safetensors.index.json` + shards), or a single `*.safetensors` file holding the full state dict (ComfyUI's
`models/diffusion_models/*.safetensors`; no config.json is read then). Everything is checked before any weight is
read: config.json architecture fields against `cfg`, then every key and shape against the model `cfg` describes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from acestep_ft.atomic import atomic_directory
from acestep_ft.data.fingerprint import tensor_digest

from .acestep import AceStepModel, encoder_dims
from .layers import layer_types
from .variants import build_meta_model, describe_size, guess_variant, modeling_module

log = logging.getLogger(__name__)

# config.json fields that define the architecture, with the official AceStepConfig defaults used when a field is absent.
ARCH_DEFAULTS: Dict[str, Any] = {
    "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 128, "in_channels": 192, "audio_acoustic_hidden_dim": 64, "patch_size": 2,
    "text_hidden_dim": 1024, "timbre_hidden_dim": 64, "num_lyric_encoder_hidden_layers": 8,
    "num_timbre_encoder_hidden_layers": 4, "num_attention_pooler_hidden_layers": 2, "pool_window_size": 5,
    "fsq_dim": 2048, "fsq_input_levels": [8, 8, 8, 5, 5, 5], "fsq_input_num_quantizers": 1,
    "rope_theta": 1_000_000, "use_sliding_window": True, "sliding_window": 128, "rms_norm_eps": 1e-6,
}
ENCODER_FIELDS = ("encoder_hidden_size", "encoder_intermediate_size", "encoder_num_attention_heads",
                  "encoder_num_key_value_heads")
# Fields our implementation hard-codes; a config.json asking for anything else cannot be reproduced.
FIXED_FIELDS: Dict[str, Any] = {"attention_bias": False, "hidden_act": "silu", "rope_scaling": None}
# Not architecture, but worth a warning when they disagree (training timesteps, exported metadata).
SOFT_FIELDS = ("timestep_mu", "timestep_sigma", "model_version", "timbre_fix_frame", "max_position_embeddings")
CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME = "config.json", "model.safetensors", "model.safetensors.index.json"
SUPPORT_FILES = ("configuration_acestep_v15.py", "apg_guidance.py", "silence_latent.pt")
SILENCE_NAME = "silence_latent.pt"
# the official checkpoint layout puts these beside the DiT directory
VAE_DIR = "vae"
TEXT_ENCODER_DIR = "Qwen3-Embedding-0.6B"
SILENCE_FRAMES = 15000  # the official silence latent: [1, 64, 15000] (10 minutes at 25 latent frames per second)
# Where a variant's official files live (the checkpoint directory official inference downloads).
OFFICIAL_HOME = {
    "turbo": "Hugging Face ACE-Step/Ace-Step1.5, folder acestep-v15-turbo",
    "base": "Hugging Face ACE-Step/acestep-v15-base", "sft": "Hugging Face ACE-Step/acestep-v15-sft",
    "xl_turbo": "Hugging Face ACE-Step/acestep-v15-xl-turbo", "xl_base": "Hugging Face ACE-Step/acestep-v15-xl-base",
    "xl_sft": "Hugging Face ACE-Step/acestep-v15-xl-sft",
}


def official_field(official: Mapping[str, Any], name: str) -> Any:
    """An architecture field of a checkpoint's config.json; absent means the official AceStepConfig default."""
    return official.get(name, ARCH_DEFAULTS[name])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def config_differences(cfg: Any, official: Mapping[str, Any]) -> List[str]:
    """Architecture fields of an official config.json that disagree with `cfg`, as "field: file=X, config=Y"."""
    diffs = []

    def check(name: str, file_value: Any, cfg_value: Any) -> None:
        if not _same(file_value, cfg_value):
            diffs.append(f"{name}: checkpoint={file_value!r}, config={cfg_value!r}")

    for name in ARCH_DEFAULTS:
        if name == "sliding_window" and not official_field(official, "use_sliding_window") and not cfg.use_sliding_window:
            continue  # no band at all, the width is irrelevant
        cfg_value = list(cfg.fsq_input_levels) if name == "fsq_input_levels" else getattr(cfg, name)
        check(name, official_field(official, name), cfg_value)
    ed = encoder_dims(cfg)
    mine = dict(zip(ENCODER_FIELDS, (ed.hidden_size, ed.intermediate_size, ed.num_heads, ed.num_kv_heads)))
    decoder_value = dict(zip(ENCODER_FIELDS, ("hidden_size", "intermediate_size", "num_attention_heads",
                                              "num_key_value_heads")))
    for name in ENCODER_FIELDS:
        file_value = official.get(name) or official_field(official, decoder_value[name])
        check(name, file_value, mine[name])
    if official.get("layer_types") is not None and len(official["layer_types"]) == cfg.num_hidden_layers:
        check("layer_types", list(official["layer_types"]), layer_types(cfg.num_hidden_layers))
    for name, fixed in FIXED_FIELDS.items():
        if name in official and official[name] != fixed:
            diffs.append(f"{name}: checkpoint={official[name]!r}, supported={fixed!r}")
    if "is_turbo" in official:
        check("is_turbo", bool(official["is_turbo"]), bool(cfg.is_turbo))
    auto_model = (official.get("auto_map") or {}).get("AutoModel", "")
    if auto_model:  # XL modeling files prepend the timbre CLS token, 2B files do not
        check("timbre_special_token (from auto_map)", "_xl_" in auto_model, bool(cfg.timbre_special_token))
    return diffs


def _weight_files(path: Path) -> Tuple[List[Path], Optional[Path]]:
    """-> (safetensors files, config.json or None)."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: expected a directory or a .safetensors file")
        return [path], None
    if not path.is_dir():
        raise FileNotFoundError(f"model path {path} does not exist")
    config = path / CONFIG_NAME
    if not config.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME} (an official ACE-Step DiT directory has one)")
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME], config
    if (path / INDEX_NAME).is_file():
        weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))], config
    present = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(f"{path} has neither {WEIGHTS_NAME} nor {INDEX_NAME}; found {present}")


def _read_shapes(files: Sequence[Path]) -> Dict[str, Tuple[Tuple[int, ...], Path]]:
    shapes: Dict[str, Tuple[Tuple[int, ...], Path]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = (tuple(f.get_slice(key).get_shape()), file)
    return shapes


def _check_keys(expected: Mapping[str, Tuple[int, ...]], found: Mapping[str, Tuple[int, ...]], where: str) -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k}: checkpoint {list(found[k])} vs model {list(expected[k])}"
             for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return

    def head(items: List[str]) -> str:
        return "".join(f"\n    {item}" for item in items[:10]) + ("\n    ..." if len(items) > 10 else "")

    raise ValueError(
        f"{where} does not match the configured model strictly.\n"
        f"  missing keys ({len(missing)}):{head(missing)}\n"
        f"  unexpected keys ({len(unexpected)}):{head(unexpected)}\n"
        f"  shape mismatches ({len(wrong)}):{head(wrong)}\n"
        f"  the checkpoint looks like: {guess_variant(found)}; the config describes: {guess_variant(expected)}"
    )


def load_model(cfg: Any, device: Any = "cpu", dtype: torch.dtype = torch.float32,
               float32_keys: Optional[Callable[[str], bool]] = None) -> AceStepModel:
    """Build an `AceStepModel` from `cfg`; weights from `cfg.path`, or random init if it is None.

    Random init uses torch's global RNG on the CPU (seed torch before calling for reproducible weights).
    Loading builds the model on the meta device and assigns the checkpoint tensors (cast to `dtype`, or to float32
    for the keys `float32_keys` selects, moved to `device`) so a full-size model is allocated once, in the dtype it
    will train in. Raises ValueError on any config.json architecture difference or any missing / unexpected /
    mis-shaped key.
    """
    keep32 = float32_keys or (lambda key: False)
    if cfg.path is None:
        model = AceStepModel(cfg).to(device=device)
        for name, p in model.named_parameters():
            p.data = p.data.to(torch.float32 if keep32(name) else dtype)
        return model
    path = Path(os.path.expanduser(str(cfg.path)))
    files, config_file = _weight_files(path)
    official = json.loads(config_file.read_text()) if config_file else None
    if official is not None:
        diffs = config_differences(cfg, official)
        if diffs:
            looks_like = describe_size(official_field(official, "num_hidden_layers"),
                                       official_field(official, "hidden_size"))
            raise ValueError(
                f"{config_file} disagrees with the model config (variant={cfg.variant!r}) on:\n  " + "\n  ".join(diffs)
                + f"\nThe checkpoint looks like {looks_like}; the config describes "
                + f"{describe_size(cfg.num_hidden_layers, cfg.hidden_size)}. Pick the model config that matches it.")
        for name in SOFT_FIELDS:
            if name in official and not _same(official[name], getattr(cfg, name)):
                log.warning("%s: %s=%r in the checkpoint, %r in the config (config wins)", path, name,
                            official[name], getattr(cfg, name))
    model = build_meta_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = _read_shapes(files)
    _check_keys(expected, {k: s for k, (s, _) in found.items()}, str(path))
    state: Dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # one tensor at a time: cast + move before reading the next
                tensor = f.get_tensor(key)
                target = (torch.float32 if keep32(key) else dtype) if tensor.is_floating_point() else tensor.dtype
                state[key] = tensor.to(device=device, dtype=target)
    model.load_state_dict(state, strict=True, assign=True)
    left_on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:  # cannot happen with a strict key check, but a meta tensor would fail much later and obscurely
        raise RuntimeError(f"tensors left on the meta device after loading: {left_on_meta[:5]}")
    model.source_config = official
    model.source_path = str(path)
    return model


def official_config(model: AceStepModel, dtype: torch.dtype = torch.bfloat16) -> Dict[str, Any]:
    """The config.json an official loader (`AutoModel.from_pretrained(..., trust_remote_code=True)`) expects."""
    cfg = model.cfg
    out: Dict[str, Any] = dict(model.source_config or {})
    for name in ARCH_DEFAULTS:
        value = getattr(cfg, name)
        out[name] = list(value) if name == "fsq_input_levels" else value
    out["sliding_window"] = cfg.sliding_window if cfg.use_sliding_window else None
    for name in ENCODER_FIELDS:
        if getattr(cfg, name) is not None:
            out[name] = getattr(cfg, name)
    dtype_name = str(dtype).replace("torch.", "")
    out.update(FIXED_FIELDS)
    out.update(
        architectures=["AceStepConditionGenerationModel"],
        auto_map={"AutoConfig": "configuration_acestep_v15.AceStepConfig",
                  "AutoModel": f"{modeling_module(cfg)}.AceStepConditionGenerationModel"},
        model_type="acestep", dtype=dtype_name, torch_dtype=dtype_name,
        layer_types=layer_types(cfg.num_hidden_layers), is_turbo=bool(cfg.is_turbo),
        model_version=cfg.model_version, timestep_mu=cfg.timestep_mu, timestep_sigma=cfg.timestep_sigma,
        timbre_fix_frame=cfg.timbre_fix_frame, max_position_embeddings=cfg.max_position_embeddings,
    )
    for name, default in (("attention_dropout", 0.0), ("data_proportion", 0.5), ("vocab_size", 64003),
                          ("initializer_range", 0.02), ("use_cache", True), ("tie_word_embeddings", True),
                          ("num_audio_decoder_hidden_layers", cfg.num_hidden_layers)):
        out.setdefault(name, default)
    return out


def save_full_model(model: AceStepModel, directory: Any, dtype: torch.dtype = torch.bfloat16,
                    state: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    """Write `directory/config.json` + `directory/model.safetensors` (full state dict in `dtype`), atomically.

    `state` replaces `model.state_dict()` (weights gathered from a sharded run, or averaged ones).

    Everything is written into a temporary sibling directory that then replaces `directory` (an existing one is
    moved aside first and deleted after the swap), so readers never see a half-written checkpoint. Support files of
    the source directory (`configuration_acestep_v15.py`, `modeling_*.py`, `apg_guidance.py`, `silence_latent.pt`)
    are copied when the model was loaded from one, so the result also loads with the official code.
    """
    target = Path(directory)
    expected = {k for k, _ in build_meta_model(model.cfg).state_dict().items()}
    state = model.state_dict() if state is None else state
    if set(state) != expected:
        extra = sorted(set(state) - expected)[:5]
        raise ValueError(f"model state dict has keys outside the official layout (merge adapters first?): {extra}")
    tensors = {k: v.detach().to(device="cpu", dtype=dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in state.items()}
    with atomic_directory(target) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(official_config(model, dtype), indent=2, sort_keys=True) + "\n")
        source = model.source_path
        if source and Path(source).is_dir():
            for item in Path(source).iterdir():
                if item.name in SUPPORT_FILES or (item.name.startswith("modeling_") and item.suffix == ".py"):
                    shutil.copy2(item, tmp / item.name)
        if model.cfg.variant == "tiny" and not (tmp / SILENCE_NAME).exists():
            # model=tiny trains on zeros as its silence latent (no VAE to encode silence): write what it used
            torch.save(torch.zeros(1, model.cfg.audio_acoustic_hidden_dim, SILENCE_FRAMES), tmp / SILENCE_NAME)
    return target


def official_files(cfg: Any) -> Tuple[str, ...]:
    """The files next to config.json and the weights that official inference (AutoModel.from_pretrained(dir,
    trust_remote_code=True)) imports or reads: the config and modeling code auto_map names, and the silence latent."""
    return ("configuration_acestep_v15.py", f"{modeling_module(cfg)}.py", "apg_guidance.py", SILENCE_NAME)


def missing_official_files(directory: Any, cfg: Any) -> str:
    """"" when `directory` holds every official file; else which are missing and where to copy them from."""
    missing = [name for name in official_files(cfg) if not (Path(directory) / name).is_file()]
    if not missing:
        return ""
    home = OFFICIAL_HOME.get(cfg.variant, "the official checkpoint directory of the variant this model was made "
                             f"from (its config.json auto_map names {modeling_module(cfg)})")
    return (f"{directory} lacks {', '.join(missing)}, which official ACE-Step inference needs to load it (the model "
            f"was not loaded from an official directory, so there was nothing to copy). Copy them from {home}"
            " (the .py files also live in the ACE-Step-1.5 source tree under acestep/models/).")


def condition_encoder_digest(model: AceStepModel) -> str:
    """Identifies the condition-encoder weights whose outputs a preprocessed dataset caches (fingerprint field)."""
    return tensor_digest({f"encoder.{k}": v for k, v in model.encoder.state_dict().items()})
