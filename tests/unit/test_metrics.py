"""metrics.jsonl bookkeeping and wandb naming."""


from acestep_ft.config import LoggerConfig
from acestep_ft.train.metrics import MetricsSink, read_metrics, truncate_after, wandb_group_and_tags


def test_sink_appends_and_resume_truncates(tmp_path):
    sink = MetricsSink(tmp_path, LoggerConfig(), {}, {})
    for step in range(1, 6):
        sink.log(step, {"train/loss": float(step)})
    sink.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    # a run resumed from step 3 rewrites steps 4.. instead of duplicating them
    sink = MetricsSink(tmp_path, LoggerConfig(), {}, {}, start_step=3)
    sink.log(4, {"train/loss": 40.0})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["train/loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_truncate_missing_file_is_a_no_op(tmp_path):
    truncate_after(tmp_path / "metrics.jsonl", 3)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_disabled_sink_writes_nothing(tmp_path):
    sink = MetricsSink(tmp_path, LoggerConfig(), {}, {}, enabled=False)
    sink.log(1, {"train/loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()


def test_wandb_group_and_tags_from_choices():
    group, tags = wandb_group_and_tags({"model": "tiny", "mode": "lora", "optim": "adamw"}, ["mine"])
    assert group == "model=tiny,mode=lora"
    assert tags == ["mode=lora", "model=tiny", "optim=adamw", "mine"]
    assert wandb_group_and_tags({}, [])[0] is None


def test_audio_reaches_tensorboard_and_sample_names_are_safe(tmp_path):
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from acestep_ft.config import LoggerConfig
    from acestep_ft.train.metrics import MetricsSink
    from acestep_ft.train.sample_audio import file_name

    sink = MetricsSink(tmp_path, LoggerConfig(backend="tensorboard"), {}, {})
    sink.log_audio(3, "samples/a", np.zeros((480, 2), dtype=np.float32), 2400)
    sink.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"audio": 0})
    events.Reload()
    assert events.Tags()["audio"] == ["samples/a"] and events.Audio("samples/a")[0].step == 3
    assert file_name("album/b stereo.flac") == "album_b_stereo.flac" and file_name("../..") == "sample"
