"""Reading preprocessed .pt directories: official manifest.json layout, Side-Step layout, and every error path."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import changed, sample_dict
from acestep_ft.config import CacheConfig, PreprocessedDataset
from acestep_ft.data import DataError, PtDirectory, build_dataset, read_sample

H = 16
FIELDS = ("target_latents", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "context_latents")


def assert_matches(sample, written: dict, key: str) -> None:
    assert sample.key == key
    for name in FIELDS:
        got = getattr(sample, name)
        assert got.dtype == torch.float32, name
        assert torch.equal(got, written[name].float()), name


def official_dir(root: Path, n: int = 3) -> tuple[Path, list[dict]]:
    """Official layout: tensors in a subfolder, manifest.json with relative paths (one Windows-style)."""
    (root / "tensors").mkdir(parents=True)
    written, entries = [], []
    for i in range(n):
        d = sample_dict(t=10 + i, seed=i)
        torch.save(d, root / "tensors" / f"song_{i}.pt")
        written.append(d)
        entries.append(f"tensors\\song_{i}.pt" if i == 1 else f"tensors/song_{i}.pt")
    manifest = {"metadata": {"name": "tiny", "custom_tag": "", "tag_position": "prepend", "created_at": "now",
                             "num_samples": n, "all_instrumental": True, "genre_ratio": 0},
                "samples": entries, "num_samples": n}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root, written


def test_official_manifest_dir_loads_bf16_as_float32_in_manifest_order(tmp_path):
    root, written = official_dir(tmp_path / "ds")
    src = build_dataset(PreprocessedDataset(path=str(root)), CacheConfig(), widths=H)
    assert len(src) == 3
    assert src.keys == ["song_0", "song_1", "song_2"]
    for i in range(3):
        assert_matches(src[i], written[i], f"song_{i}")


def test_manifest_absolute_and_moved_paths_resolve(tmp_path):
    root, written = official_dir(tmp_path / "ds", n=2)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["samples"] = [str(root / "tensors" / "song_0.pt"), "/old/machine/tensors/song_1.pt"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(root / "tensors" / "song_1.pt", root / "song_1.pt")  # moved beside the manifest
    src = PtDirectory(root, H)
    assert_matches(src[0], written[0], "song_0")
    assert_matches(src[1], written[1], "song_1")


def test_manifest_missing_files_are_all_listed_at_construction(tmp_path):
    root, _ = official_dir(tmp_path / "ds", n=3)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["samples"] += ["tensors/gone_a.pt", "tensors/gone_b.pt"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as err:
        PtDirectory(root, H)
    msg = str(err.value)
    assert "manifest.json" in msg and "2 of 5" in msg
    assert "gone_a.pt" in msg and "gone_b.pt" in msg and "Fix:" in msg


@pytest.mark.parametrize("with_meta", [True, False])
def test_sidestep_dir_scans_sorted_pt_and_skips_tmp(tmp_path, with_meta):
    root = tmp_path / "ss"
    root.mkdir()
    written = {name: sample_dict(t=8 + i, dtype=torch.float32, seed=i) for i, name in enumerate(["b", "a", "c"])}
    for name, d in written.items():
        torch.save(d, root / f"{name}.pt")
    torch.save({"text_hidden_states": torch.zeros(1, 4, 8)}, root / "z.tmp.pt")  # pass-1 intermediate
    if with_meta:
        (root / "preprocess_meta.json").write_text(json.dumps({"variant": "turbo", "checksums": {"a.pt": "0"}}))
    src = build_dataset(PreprocessedDataset(path=str(root)), CacheConfig(), widths=H)
    assert src.keys == ["a", "b", "c"]
    for i, name in enumerate(src.keys):
        assert_matches(src[i], written[name], name)


def test_empty_or_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no training samples"):
        PtDirectory(tmp_path, H)
    torch.save({}, tmp_path / "x.tmp.pt")
    with pytest.raises(DataError, match="tmp.pt"):
        PtDirectory(tmp_path, H)
    with pytest.raises(DataError, match="does not exist"):
        PtDirectory(tmp_path / "nope", H)
    with pytest.raises(DataError, match="dataset.path"):
        build_dataset(PreprocessedDataset(path=None), CacheConfig(), H)


def write_one(tmp_path: Path, d) -> Path:
    path = tmp_path / "bad_song.pt"
    torch.save(d, path)
    return path


def bad(**change):
    return changed(sample_dict(t=12), **change)


NAN = sample_dict(t=12)["target_latents"].clone()
NAN[3, 5] = float("nan")


@pytest.mark.parametrize(
    "data, key, found",
    [
        (bad(context_latents=None), "context_latents", "missing"),
        (bad(context_latents=torch.zeros(12, 65)), "context_latents", "[12, 65]"),
        (bad(attention_mask=torch.ones(11)), "attention_mask", "[11]"),
        (bad(target_latents=torch.zeros(12, 32)), "target_latents", "[12, 32]"),
        (bad(encoder_attention_mask=torch.ones(1, 9)), "encoder_attention_mask", "[1, 9]"),
        (bad(encoder_hidden_states=torch.zeros(9, 2048)), "encoder_hidden_states", "H_enc = 2048"),
        (bad(target_latents=NAN), "target_latents", "NaN/Inf"),
        (bad(context_latents=torch.full((12, 128), float("inf"))), "context_latents", "NaN/Inf"),
        (bad(target_latents=torch.zeros(12, 64, dtype=torch.int64)), "target_latents", "torch.int64"),
    ],
)
def test_invalid_sample_names_file_key_found_expected_and_fix(tmp_path, data, key, found):
    path = write_one(tmp_path, data)
    src = PtDirectory(tmp_path, H)
    with pytest.raises(DataError) as err:
        src[0]
    msg = str(err.value)
    assert str(path) in msg and f"'{key}'" in msg and found in msg
    assert "expected" in msg and "Fix:" in msg


def test_unreadable_or_non_dict_files_are_data_errors(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="corrupt.pt.*torch.load"):
        read_sample(path, H)
    torch.save(torch.zeros(1, 64, 30), path)  # e.g. silence_latent.pt dropped into the folder
    with pytest.raises(DataError, match="corrupt.pt.*not a sample file"):
        read_sample(path, H)


def test_bool_masks_and_views_become_compact_float32(tmp_path):
    d = sample_dict(t=6, dtype=torch.float32)
    big = torch.randn(6, 256)
    d["context_latents"] = big[:, :128]  # a view: torch.save keeps the whole storage
    d["attention_mask"] = torch.ones(6, dtype=torch.bool)
    s = read_sample(write_one(tmp_path, d), H)
    assert s.attention_mask.dtype == torch.float32 and torch.all(s.attention_mask == 1)
    assert s.context_latents.untyped_storage().nbytes() == 6 * 128 * 4
    assert torch.equal(s.context_latents, big[:, :128])


def test_lengths_and_condition_lengths_come_from_the_headers(tmp_path):
    root, written = official_dir(tmp_path)
    src = PtDirectory(root, widths=16)
    assert src.lengths == [d["target_latents"].shape[0] for d in written]
    assert src.cond_lengths == [d["encoder_hidden_states"].shape[0] for d in written]
