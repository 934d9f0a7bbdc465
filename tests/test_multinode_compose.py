"""The multi-node paths compose: the SLURM launcher preset (conf/hydra/launcher/slurm_gpu.yaml) with a sweep, the
sbatch script submitit would submit for it, its SLURM -> torch environment mapping (run for real with submitit's
local executor: two tasks become one two-process run), and the accelerate launch configs (scripts/accelerate/)
read and turned into torchrun arguments by Accelerate's own code."""

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from acestep_ft.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PRESET = CONF / "hydra" / "launcher" / "slurm_gpu.yaml"
ACCELERATE_DIR = ROOT / "scripts" / "accelerate"
MULTI_NODE = ["multi_node_fsdp.yaml", "multi_node_deepspeed.yaml"]
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
# what each torch variable is read from in a SLURM task, and in a task of submitit's local executor
TORCH_FROM_SLURM = {"RANK": "SLURM_PROCID", "LOCAL_RANK": "SLURM_LOCALID", "WORLD_SIZE": "SLURM_NTASKS"}
SLURM_TO_LOCAL = {"SLURM_PROCID": "SUBMITIT_LOCAL_GLOBALID", "SLURM_LOCALID": "SUBMITIT_LOCAL_LOCALID",
                  "SLURM_NTASKS": "SUBMITIT_LOCAL_NTASKS"}

needs_submitit = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="hydra-submitit-launcher is not installed (pip install -e '.[dev]')",
)

register_configs()


def compose_with_hydra(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="train"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def preset_launcher_keys():
    return yaml.safe_load(PRESET.read_text())["hydra"]["launcher"]


# ---------------------------------------------------------------- SLURM preset


@needs_submitit
def test_slurm_preset_is_submitit_slurm_with_its_settings():
    cfg = compose_with_hydra(["hydra/launcher=slurm_gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == SLURM_LAUNCHER
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "slurm_gpu"
    want = preset_launcher_keys()
    assert want, "the preset sets no launcher field"
    for key, value in want.items():
        assert OmegaConf.to_container(launcher)[key] == value, key
    # one process per GPU, every process seeing all of the node's GPUs (Accelerate picks cuda:LOCAL_RANK)
    assert launcher.tasks_per_node == launcher.gpus_per_node >= 1
    assert launcher.gpus_per_task is None
    # the setup exports what env:// needs besides the per-task variables
    assert any("MASTER_ADDR=" in line for line in launcher.setup)
    assert any("MASTER_PORT=" in line for line in launcher.setup)
    # the launcher preset leaves training untouched
    assert cfg.train == compose_with_hydra([]).train


@needs_submitit
def test_slurm_preset_fields_are_checked_against_the_plugin_schema():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_with_hydra(["hydra/launcher=slurm_gpu", "hydra.launcher.gpus_per_nod=4"])


@needs_submitit
def test_slurm_preset_maps_slurm_task_variables_to_torch(monkeypatch):
    cfg = compose_with_hydra(["hydra/launcher=slurm_gpu"])
    raw = OmegaConf.to_container(cfg.hydra.job.env_set, resolve=False)
    assert raw == {k: "${oc.env:" + v + "}" for k, v in TORCH_FROM_SLURM.items()}
    monkeypatch.setenv("SLURM_PROCID", "11")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert OmegaConf.to_container(cfg.hydra.job.env_set, resolve=True) == {
        "RANK": "11", "LOCAL_RANK": "3", "WORLD_SIZE": "16"}
    # outside a SLURM task the mapping fails loudly instead of making every process rank 0 of 1
    monkeypatch.delenv("SLURM_PROCID")
    with pytest.raises(Exception, match="SLURM_PROCID"):
        OmegaConf.to_container(cfg.hydra.job.env_set, resolve=True)


def split_sweep(overrides):
    """The job override lists Hydra's basic sweeper makes of a -m command line."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [job for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None) for job in batch]


@needs_submitit
def test_sweep_with_slurm_preset_composes_every_job():
    jobs = split_sweep(["optim.lr=1e-4,3e-4", "mode.rank=8"])
    assert len(jobs) == 2
    lrs = []
    for job in jobs:
        cfg = compose_with_hydra(["hydra/launcher=slurm_gpu", *job])
        assert cfg.hydra.launcher._target_ == SLURM_LAUNCHER
        assert cfg.mode.rank == 8
        lrs.append(cfg.optim.lr)
    assert sorted(lrs) == [1e-4, 3e-4]


@needs_submitit
def test_slurm_launcher_writes_the_expected_sbatch_script(tmp_path, monkeypatch):
    """The plugin's own launch(), up to the submission: every preset field must reach sbatch."""
    import submitit
    from hydra.utils import instantiate

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks that SLURM's srun exists
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")

    cfg = compose_with_hydra(["hydra/launcher=slurm_gpu", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__module__ + "." + type(launcher).__qualname__ == SLURM_LAUNCHER
    launcher.config = cfg
    seen = {}

    class Submitted(Exception):
        pass

    def fake_map_array(self, fn, *iterables):
        seen["jobs"] = list(iterables[0])
        seen["script"] = self._executor._make_submission_file_text("python -u -m submitit.core._submit DIR", "x")
        raise Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", fake_map_array)
    jobs = split_sweep(["optim.lr=1e-4,3e-4"])
    with pytest.raises(Submitted):
        launcher.launch(jobs, initial_job_idx=0)
    assert seen["jobs"] == [list(j) for j in jobs]

    script = seen["script"]
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script, flags=re.M))
    want = preset_launcher_keys()
    assert flags["gpus-per-node"] == str(want["gpus_per_node"])
    assert flags["ntasks-per-node"] == str(want["tasks_per_node"])
    assert flags["cpus-per-task"] == str(want["cpus_per_task"])
    assert flags["mem"] == f"{want['mem_gb']}GB"
    assert flags["time"] == str(want["timeout_min"])
    assert flags["nodes"] == str(want["nodes"])
    assert flags["job-name"] == "train"
    assert flags["signal"].endswith(f"@{want['signal_delay_s']}")
    assert "gpus-per-task" not in flags
    # the setup lines run in the batch script, before srun starts the tasks (which inherit what they export)
    lines = script.splitlines()
    srun_at = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    for line in want["setup"]:
        assert line in lines[:srun_at], line


def free_port_base():
    """B such that ports 10*B and 10*B+1 are free (the sweep below gives job N the port f"{B}{N}")."""
    for base in range(2400, 6500, 37):
        try:
            for port in (10 * base, 10 * base + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    pytest.skip("no free port pair found")


@needs_submitit
@pytest.mark.slow
def test_two_tasks_per_job_train_as_one_two_process_run(tmp_path):
    """The preset's mapping, with submitit's local executor standing in for SLURM: a two-job sweep, each job two
    tasks (processes) with the SLURM names swapped for the local executor's, on the CPU. Each job must be one run
    of two processes, not two single-process runs writing into the same directory."""
    cfg = compose_with_hydra(["hydra/launcher=slurm_gpu"])
    env_set = OmegaConf.to_container(cfg.hydra.job.env_set, resolve=False)
    local_env = {}
    for key, value in env_set.items():
        slurm_name = re.fullmatch(r"\$\{oc\.env:(\w+)\}", value).group(1)
        local_env[key] = "${oc.env:" + SLURM_TO_LOCAL[slurm_name] + "}"
    local_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=f"{free_port_base()}" + "${hydra.job.num}")

    sweep = tmp_path / "sweep"
    steps = 4
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
           "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}", "hardware=cpu", f"train.max_steps={steps}",
           "train.save_every=2", "train.plot=false", "optim.lr=1e-3,2e-3"]
    cmd += [f"+hydra.job.env_set.{k}={v}" for k, v in local_env.items()]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    logs = "\n".join(p.read_text() for p in sorted(sweep.glob(".submitit/*/*_log.*")))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + logs[-5000:]

    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(runs) == 2, runs
    for run in runs:
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        # one writer (the main process of a two-process run): each step logged once
        assert [x["step"] for x in lines] == list(range(1, steps + 1)), run
        assert (run / "checkpoints").is_dir()
    outs = [p.read_text() for p in sweep.glob(".submitit/*/*_0_log.out")]
    assert len(outs) == 2
    for out in outs:
        assert re.search(r"x 2 process\(es\)", out), out[-2000:]


# ---------------------------------------------------------------- accelerate launch configs


def cluster_config(name):
    from accelerate.commands.config.config_args import ClusterConfig

    return ClusterConfig.from_yaml_file(str(ACCELERATE_DIR / name))


def launch_args(config_name, *extra):
    """What `accelerate launch --config_file F ... train.py` hands to torchrun, by Accelerate's own code."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(ACCELERATE_DIR / config_name), *extra, "train.py", "hydra.run.dir=outputs/x"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    return args, env


@pytest.mark.parametrize("name", MULTI_NODE)
def test_multi_node_accelerate_config_describes_machines_only(name):
    from accelerate.utils import DistributedType

    cfg = cluster_config(name)
    assert cfg.distributed_type == DistributedType.MULTI_GPU  # the engine comes from hardware.distributed
    assert cfg.num_machines == 2 and cfg.num_processes == 16 and cfg.machine_rank == 0
    assert cfg.main_process_ip and cfg.main_process_port == 29500
    assert cfg.fsdp_config == {} and cfg.deepspeed_config == {} and cfg.megatron_lm_config == {}
    assert cfg.mixed_precision == "no" and cfg.use_cpu is False


def test_multi_node_configs_describe_the_same_machines():
    fsdp, deepspeed = (cluster_config(n).to_dict() for n in MULTI_NODE)
    assert fsdp == deepspeed


@pytest.mark.parametrize("name", MULTI_NODE)
def test_multi_node_accelerate_launch_becomes_torchrun_without_an_engine(name):
    args, env = launch_args(name, "--machine_rank", "1")
    cfg = cluster_config(name)
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed and not args.cpu
    assert args.nnodes == "2" and args.nproc_per_node == "8" and args.node_rank == 1
    assert args.rdzv_endpoint == f"{cfg.main_process_ip}:{cfg.main_process_port}"
    # the file states the rendezvous that really happens (accelerate launch ignores the file's rdzv_backend)
    assert args.rdzv_backend == cfg.rdzv_backend
    # nothing that would make Accelerator build an FSDP/DeepSpeed plugin behind hardware.distributed's back
    assert not {k for k in env if k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED") or k.startswith("FSDP_")}


def test_single_node_accelerate_config():
    from accelerate.utils import DistributedType

    cfg = cluster_config("single_node.yaml")
    assert cfg.distributed_type == DistributedType.MULTI_GPU and cfg.num_machines == 1 and cfg.num_processes == 8
    args, env = launch_args("single_node.yaml")
    assert args.nproc_per_node == "8" and args.multi_gpu
    assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env


def test_accelerate_launch_cpu_starts_one_process(monkeypatch):
    """The trap docs/multinode.md warns about: --cpu takes the single-process launcher whatever --num_processes."""
    import accelerate.commands.launch as launch

    called = []
    monkeypatch.setattr(launch, "simple_launcher", lambda args: called.append("simple"))
    monkeypatch.setattr(launch, "multi_gpu_launcher", lambda args: called.append("multi"))
    args = launch.launch_command_parser().parse_args(["--cpu", "--num_processes", "2", "--num_machines", "1",
                                                      "--mixed_precision", "no", "--dynamo_backend", "no",
                                                      "train.py"])
    launch.launch_command(args)
    assert called == ["simple"]
