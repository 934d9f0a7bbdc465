"""Atomic writes: targets get the modes a plain mkdir/open would (umask honoured), swaps keep the new content, a
failing block leaves the old target and no temp behind."""

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

import acestep_ft.atomic as atomic
from acestep_ft.atomic import atomic_directory, atomic_write_bytes, current_umask


@pytest.fixture
def umask():
    """Set the process umask for one test; the old one is restored afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def hidden(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("mask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)],
                         ids=["022", "077"])
def test_modes_follow_umask(tmp_path, umask, mask, dir_mode, file_mode):
    umask(mask)
    with atomic_directory(tmp_path / "ckpt") as tmp:
        (tmp / "inner.txt").write_text("x")
        (tmp / "adapter").mkdir(mode=0o700)
        save_file({"w": torch.zeros(2)}, str(tmp / "adapter" / "w.safetensors"))  # safetensors writes 0600 files
    assert mode(tmp_path / "ckpt" / "adapter") == dir_mode
    assert mode(tmp_path / "ckpt" / "adapter" / "w.safetensors") == file_mode
    atomic_write_bytes(tmp_path / "best.json", b"{}")
    assert mode(tmp_path / "ckpt") == dir_mode
    assert mode(tmp_path / "ckpt" / "inner.txt") == file_mode
    assert mode(tmp_path / "best.json") == file_mode


def test_umask_read_without_proc(umask, monkeypatch):
    umask(0o027)
    assert current_umask() == 0o027

    def no_proc(*args, **kwargs):
        raise OSError("no /proc")

    monkeypatch.setattr(atomic, "open", no_proc, raising=False)  # forces the set-and-restore fallback
    assert current_umask() == 0o027
    assert os.umask(0o027) == 0o027  # ...which left the umask as it was


def test_replaced_directory_keeps_new_content(tmp_path):
    target = tmp_path / "export"
    with atomic_directory(target) as tmp:
        (tmp / "old.txt").write_text("old")
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert (target / "new.txt").read_text() == "new"
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failing_block_keeps_old_target(tmp_path, error):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(error):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise error()
    assert (target / "a.txt").read_text() == "old"
    assert hidden(tmp_path) == []


def test_write_bytes_replaces_file(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"old\n")
    path.chmod(0o600)
    atomic_write_bytes(path, b"new\n")
    assert path.read_bytes() == b"new\n"
    assert mode(path) == 0o644
    assert hidden(tmp_path) == []
