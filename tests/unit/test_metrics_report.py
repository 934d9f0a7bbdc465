"""What a run's metrics turn into: loss_curve.png (loss, validation, learning rate), the final numbers a sweep compares,
and the resolved config as tensorboard HParams in the run's own tensorboard directory."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from acestep_ft.config import register_configs
from acestep_ft.train.metrics import HPARAM_METRICS, MetricsSink, flat_hparams, plot_loss, run_numbers

ROOT = Path(__file__).resolve().parents[2]


def write_metrics(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def train_records(n=12, lr=True, groups=()):
    out = []
    for step in range(1, n + 1):
        r = {"step": step, "train/loss": 2.0 - 0.05 * step, "perf/step_time_s": 0.5 if step == 1 else 0.1,
             "mem/host_peak_rss_gb": 0.4 + 0.01 * step}
        if lr:
            r["train/lr"] = 1e-3 * step / n
        for i, g in enumerate(groups):
            r[f"train/lr/{g}"] = (i + 1) * 1e-3 * step / n
        out.append(r)
    return out


def labels(ax):
    return [line.get_label() for line in ax.get_lines()]


def test_plot_without_validation_or_lr_is_one_panel(tmp_path):
    fig = plot_loss(write_metrics(tmp_path / "m.jsonl", train_records(lr=False)), tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert len(fig.axes) == 1
    assert labels(fig.axes[0])[0] == "train loss" and "validation loss" not in labels(fig.axes[0])
    assert len(fig.axes[0].get_lines()[0].get_xdata()) == 12


def test_plot_shows_validation_points_and_the_learning_rate_below(tmp_path):
    records = train_records()
    records[5]["val/loss"], records[11]["val/loss"] = 1.9, 1.5
    records.append({"step": 13, "val/loss": 1.4})  # a validation-only record (train.log_every > 1)
    fig = plot_loss(write_metrics(tmp_path / "m.jsonl", records), tmp_path / "curve.png")
    loss_ax, lr_ax = fig.axes
    val = [line for line in loss_ax.get_lines() if line.get_label() == "validation loss"]
    assert len(val) == 1 and list(val[0].get_xdata()) == [6, 12, 13] and val[0].get_marker() == "o"
    assert lr_ax.get_ylabel() == "learning rate" and len(lr_ax.get_lines()) == 1
    assert lr_ax.get_lines()[0].get_ydata()[-1] == pytest.approx(1e-3)
    assert lr_ax.get_xlabel() == "optimizer step"


def test_plot_draws_one_lr_line_per_parameter_group(tmp_path):
    fig = plot_loss(write_metrics(tmp_path / "m.jsonl", train_records(groups=("attn", "default"))),
                    tmp_path / "curve.png")
    assert labels(fig.axes[1]) == ["attn", "default"]


def test_plot_of_nothing_writes_nothing(tmp_path):
    assert plot_loss(write_metrics(tmp_path / "m.jsonl", []), tmp_path / "curve.png") is None
    assert not (tmp_path / "curve.png").exists()


def test_run_numbers():
    records = train_records(n=20)
    records[9]["val/loss"], records[19]["val/loss"] = 1.2, 1.3
    numbers = run_numbers(records)
    assert numbers["train_loss"] == pytest.approx(sum(2.0 - 0.05 * s for s in range(11, 21)) / 10)
    assert numbers["best_val_loss"] == 1.2 and numbers["final_val_loss"] == 1.3 and numbers["steps"] == 20
    assert numbers["steps_per_s"] == pytest.approx(10.0)  # the slow first step left out
    assert numbers["peak_mem_gib"] == pytest.approx(0.6) and numbers["peak_mem_of"] == "host rss"
    bare = run_numbers([{"step": 1, "train/loss": float("nan")}])
    assert bare["train_loss"] is None and bare["best_val_loss"] is None and bare["peak_mem_gib"] is None
    assert run_numbers([{"step": 1, "mem/peak_alloc_gb": 3.0, "mem/host_peak_rss_gb": 9.0}])["peak_mem_of"] == \
        "cuda alloc"


def resolved_default_config(*overrides):
    """The resolved config as run.py hands it to MetricsSink."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return OmegaConf.to_container(OmegaConf.structured(OmegaConf.to_object(cfg)))


def test_tensorboard_gets_the_resolved_config_as_hparams_in_the_run_directory(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    from acestep_ft.config import LoggerConfig

    config = resolved_default_config("logger=tensorboard", "optim.lr=2e-3", "mode.rank=4")
    sink = MetricsSink(tmp_path, LoggerConfig(backend="tensorboard"), {"mode": "lora", "model": "tiny"}, config)
    for step in range(1, 5):
        sink.log(step, {"train/loss": float(step), **({"val/loss": 0.5, "val/best": 0.5} if step == 2 else {})})
    sink.close()

    tb = tmp_path / "tensorboard"
    assert [p for p in tb.iterdir() if p.is_dir()] == []  # no add_hparams-style subdirectory
    events = EventAccumulator(str(tb))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    assert set(content) == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optim.lr"].number_value == pytest.approx(2e-3)
    assert start.hparams["mode.rank"].number_value == 4
    assert start.hparams["model.variant"].string_value == "tiny" and start.hparams["choice.mode"].string_value == "lora"
    assert start.hparams["hardware.device"].string_value == "auto"  # an enum, by name
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == set(HPARAM_METRICS.values())
    assert len(start.hparams) == len(flat_hparams(config)) + 2
    final = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if tag.startswith("hparams/")}
    assert final == {"hparams/train_loss_last10": pytest.approx(2.5), "hparams/best_val_loss": pytest.approx(0.5),
                     "hparams/final_val_loss": pytest.approx(0.5)}


def test_flat_hparams_takes_every_value_type():
    from enum import Enum

    class Kind(Enum):
        a = "a"

    flat = flat_hparams({"x": {"y": None, "z": [1, "b"], "k": Kind.a, "e": {}}, "f": 1.5, "b": True, "p": Path("/q")})
    assert flat == {"x.y": "None", "x.z": '[1, "b"]', "x.k": "a", "x.e": "{}", "f": 1.5, "b": True, "p": "/q"}
