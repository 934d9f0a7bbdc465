"""The run's life: relaunch guard, overwrite, leftovers of killed writes, signal handling and hand-on to a handler
installed before ours (submitit's requeue), and the SLURM launcher's resume requirement."""

import os
import signal
from pathlib import Path

import pytest
from accelerate import Accelerator

from acestep_ft.config import TrainConfig
from acestep_ft.launch import Launch
from acestep_ft.train.lifecycle import (
    StopSignals, clean_leftovers, prepare_run_dir, relaunch_problem, stop_status,
)


def fake_run(run_dir: Path, steps=(2, 4)) -> None:
    for step in steps:
        ckpt = run_dir / "checkpoints" / f"step-{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "training_state.pt").write_bytes(b"x")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')


def test_relaunch_into_a_used_directory_is_refused_with_both_ways_on(tmp_path):
    assert relaunch_problem(tmp_path, TrainConfig(), None) is None  # empty: a fresh start
    fake_run(tmp_path)
    newest = tmp_path / "checkpoints" / "step-00000004"
    problem = relaunch_problem(tmp_path, TrainConfig(), None)
    assert str(tmp_path) in problem and "step 4" in problem
    assert "train.resume=auto" in problem and "hydra.run.dir" in problem and "train.overwrite=true" in problem
    assert relaunch_problem(tmp_path, TrainConfig(resume="auto"), newest) is None
    assert relaunch_problem(tmp_path, TrainConfig(overwrite=True), None) is None
    assert "choose one" in relaunch_problem(tmp_path, TrainConfig(overwrite=True, resume="auto"), newest)
    # a checkpoint of another run continued into this directory would prune this run's checkpoints
    other = tmp_path.parent / "another-run" / "checkpoints" / "step-00000002"
    problem = relaunch_problem(tmp_path, TrainConfig(resume=str(other)), other)
    assert "continues a checkpoint of another directory" in problem
    # an export without checkpoints: resume=auto would find nothing and overwrite the export
    (tmp_path / "export").mkdir()
    for path in sorted((tmp_path / "checkpoints").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    assert "no checkpoint to continue from" in relaunch_problem(tmp_path, TrainConfig(resume="auto"), None)


def test_checkpoints_past_the_resumed_one_are_set_aside_not_pruned_later(tmp_path):
    fake_run(tmp_path, steps=(2, 4, 6))
    (tmp_path / "checkpoints" / "best.json").write_text('{"step": 6, "val_loss": 0.1, "path": "step-00000006"}')
    said = []
    prepare_run_dir(tmp_path, False, tmp_path / "checkpoints" / "step-00000002", said.append)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000002", "superseded-step-00000004", "superseded-step-00000006"]
    assert "set aside 2 checkpoint(s) past step 2" in said[-1]


def test_a_kill_between_the_two_renames_of_a_replacement_restores_the_old_checkpoint(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / ".step-00000004.old-x1" / "step-00000004").mkdir(parents=True)
    (ckpts / ".step-00000004.old-x1" / "step-00000004" / "training_state.pt").write_bytes(b"old")
    (ckpts / ".step-00000004.tmp-y2").mkdir()  # the complete new one, never renamed in
    said = []
    prepare_run_dir(tmp_path, False, None, said.append)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000004"]
    assert (ckpts / "step-00000004" / "training_state.pt").read_bytes() == b"old"
    assert "restored" in said[0]


def test_one_run_per_directory_at_a_time(tmp_path):
    import subprocess
    import sys

    from acestep_ft.errors import UserError
    from acestep_ft.train.lifecycle import lock_run_dir

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from acestep_ft.train.lifecycle import lock_run_dir; "
                               f"h = lock_run_dir(Path({str(tmp_path)!r})); print('locked', flush=True); "
                               "time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=r"is in use by a running training \(pid"):
            lock_run_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    lock_run_dir(tmp_path).close()  # free again once that process is gone


def test_console_survives_a_closed_pipe():
    from acestep_ft.train.lifecycle import PipeSafe

    class Closed:
        def write(self, text):
            raise BrokenPipeError

        def flush(self):
            raise BrokenPipeError

    stream = PipeSafe(Closed())
    assert stream.write("progress") == 8
    stream.flush()


def test_overwrite_deletes_the_earlier_run_but_not_foreign_files(tmp_path):
    fake_run(tmp_path)
    (tmp_path / "export").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    said = []
    prepare_run_dir(tmp_path, True, None, said.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert "checkpoints" in said[0] and "metrics.jsonl" in said[0]


def test_leftovers_of_killed_writes_are_removed_and_reported(tmp_path):
    fake_run(tmp_path, steps=(2,))
    ckpts = tmp_path / "checkpoints"
    for name in (".step-00000004.tmp-abc", ".trash-step-00000001-77", ".step-00000002.old-x"):
        (ckpts / name).mkdir()
        (ckpts / name / "model.safetensors").write_bytes(b"0" * 1000)
    (tmp_path / ".export.tmp-q").mkdir()
    (tmp_path / ".metrics.jsonl.abc.tmp").write_text("{")
    said = []
    prepare_run_dir(tmp_path, False, None, said.append)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert "removed 5 leftover(s)" in said[0] and ".step-00000004.tmp-abc" in said[0]
    assert clean_leftovers(tmp_path) == []


def test_first_signal_requests_a_stop_and_the_previous_handler_gets_it_afterwards():
    received = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: received.append(signum))  # e.g. submitit's
    try:
        stop = StopSignals()
        stop.install()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.signum == signal.SIGUSR2 and received == []  # ours only asks the loop to stop
        assert stop.agreed(Accelerator(cpu=True)) == signal.SIGUSR2
        stop.uninstall()
        stop.hand_on()
        assert received == [signal.SIGUSR2]  # after the save: requeue
        assert stop_status(signal.SIGTERM) == 143
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_no_stop_without_a_signal_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    ignored = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # e.g. inherited by a background job
    try:
        stop = StopSignals()
        stop.install()
        assert signal.getsignal(signal.SIGTERM) != before and signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
        assert stop.agreed(Accelerator(cpu=True)) is None
        stop.uninstall()
        assert signal.getsignal(signal.SIGTERM) == before
    finally:
        signal.signal(signal.SIGUSR1, ignored)


def test_the_slurm_launcher_requires_resume_auto(tmp_path):
    from hydra import compose, initialize_config_dir

    from acestep_ft.checks import check_config
    from acestep_ft.config import register_configs
    from acestep_ft.errors import ConfigError
    from acestep_ft.launch import from_hydra
    from omegaconf import OmegaConf

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    register_configs()
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with_hydra = compose(config_name="config", overrides=["hydra/launcher=slurm_gpu"], return_hydra_config=True)
        typed = OmegaConf.to_object(compose(config_name="config", overrides=["hydra/launcher=slurm_gpu"]))
    OmegaConf.set_struct(with_hydra, False)
    with_hydra.hydra.runtime.choices = {"model": "tiny"}  # set by Hydra when a job runs
    launch = from_hydra(with_hydra, with_hydra.hydra)
    assert launch.requeues and isinstance(launch, Launch)
    with_hydra.hydra.launcher = {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}
    assert not from_hydra(with_hydra, with_hydra.hydra).requeues
    with pytest.raises(ConfigError, match="requeues preempted .* use train.resume=auto"):
        check_config(typed, tmp_path, requeued=launch.requeues)
    typed.train.resume = str(tmp_path)  # a fixed checkpoint would restart from it on every requeue
    with pytest.raises(ConfigError, match="requeues preempted"):
        check_config(typed, tmp_path, requeued=True)
    typed.train.resume = "auto"
    assert check_config(typed, tmp_path, requeued=True) == (None, [])


def test_the_continue_command_parses_for_a_sweep_job_directory(tmp_path):
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    run_dir = tmp_path / "multirun" / "0_mode.rank=8,optim.lr=0.001" / "it's"
    line = Launch(command=["python", "train.py", "optim.lr=0.001"]).continue_command(run_dir)
    words = shlex.split(line)
    assert words[:3] == ["python", "train.py", "optim.lr=0.001"]
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(words[2:])}
    assert parsed["train.resume"] == "auto" and parsed["hydra.run.dir"] == str(run_dir)
