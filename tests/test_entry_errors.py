"""Every entry point but train.py on bad input: the message only (no traceback), exit 2 for usage / config errors, 1
for refusals and data that cannot be used (`acestep_ft.errors`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

PREFLIGHT = [sys.executable, "-m", "acestep_ft.preflight"]
VALIDATE = [sys.executable, "-m", "acestep_ft.data.validate", "--no-progress", "--dataset-dir"]


def run(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(list(argv), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def check(proc: subprocess.CompletedProcess, status: int, *names: str) -> None:
    assert proc.returncode == status, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert all(name in proc.stderr for name in names), proc.stderr[-3000:]


@pytest.fixture
def files(tmp_path):
    """A directory of junk, a v3 index that is not one, a file, and a folder with one (unreadable) audio file."""
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a dataset")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "index.jsonl").write_text("{not json\n")
    (tmp_path / "broken" / "fingerprint.json").mkdir()  # a directory where the file belongs
    (tmp_path / "file.txt").write_text("a file")
    (tmp_path / "songs").mkdir()
    (tmp_path / "songs" / "a.wav").write_bytes(b"RIFF")
    (tmp_path / "songs" / "a.txt").write_text("lofi piano")
    return tmp_path


def test_preflight_usage_errors_exit_2():
    check(run(*PREFLIGHT, "mode.rnak=4"), 2, "mode.rnak")
    check(run(*PREFLIGHT, "mode.rank=abc"), 2, "mode.rank=abc")
    check(run(*PREFLIGHT, "dataset=preprocessed"), 2, "dataset.path is required")


def test_preflight_refusal_and_unreadable_data_exit_1(tmp_path):
    # full mode of a real variant on the CPU (no device budget to check) without the opt-in: refused
    check(run(*PREFLIGHT, "mode=full", "model=acestep15_turbo", "hardware=cpu"), 1, "mode.i_understand_vram_risk")
    check(run(*PREFLIGHT, "dataset=preprocessed", f"dataset.path={tmp_path / 'nope'}"), 1,
          "cannot read the dataset's lengths", "does not exist")


def test_validate_bad_directories(files):
    check(run(*VALIDATE, str(files / "nope")), 2, "does not exist", "--dataset-dir")
    check(run(*VALIDATE, str(files / "junk")), 2, "not a dataset directory", "notes.txt")
    check(run(*VALIDATE, str(files / "file.txt")), 2, "is a file")
    broken = run(*VALIDATE, str(files / "broken"))  # found as errors of the report: exit 1
    check(broken, 1)
    assert "index.jsonl" in broken.stdout and "not a v3 header" in broken.stdout


def test_convert_with_a_missing_src_exits_2(tmp_path):
    proc = run(sys.executable, "scripts/convert_pt_to_v3.py", "--src", str(tmp_path / "nope"), "--dst",
               str(tmp_path / "v3"), "--no-progress")
    check(proc, 2, "--src", "is not a directory")
    assert not (tmp_path / "v3").exists()


@pytest.mark.slow
def test_preprocess_config_errors_exit_2(files):
    script = [sys.executable, "scripts/preprocess.py", "model=tiny", "hardware=cpu",
              f"preprocess.output_dir={files / 'out'}", f"hydra.run.dir={files / 'run'}"]
    check(run(*script, "preprocess.rnak=4"), 2, "preprocess.rnak")  # Hydra refuses it before the script runs
    check(run(*script, f"preprocess.input_dir={files / 'nope'}"), 2, "preprocess.input_dir")
    # no model.path: refused before any weights load
    check(run(*script, f"preprocess.input_dir={files / 'songs'}"), 2, "model.path is required")
    assert not (files / "out").exists()


def test_bench_loader_refuses_a_foreign_workdir(files):
    (files / "junk" / "pt").mkdir()
    check(run(sys.executable, "scripts/bench_loader.py", "--workdir", str(files / "junk")), 1, "--workdir")
