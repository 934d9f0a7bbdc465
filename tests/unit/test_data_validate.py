"""Dataset QA (`python -m acestep_ft.data.validate`): clean datasets pass, every planted problem is found in one run."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, sample_dict
from acestep_ft.data.fingerprint import make_fingerprint
from acestep_ft.data.qa_checks import check_sample
from acestep_ft.data.v3_reader import INDEX_NAME
from acestep_ft.data.v3_writer import write_v3
from acestep_ft.data.validate import main

H = 16
FP = make_fingerprint("tiny", None, None, None, None, {})


def run(capsys, *args):
    try:
        code = main([*args, "--no-progress"])
    except SystemExit as stopped:  # a usage error: the message on stderr, the status in the exit
        code = stopped.code
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, root, *args):
    code, out, _ = run(capsys, "--dataset-dir", str(root), "--json", *args)
    return code, json.loads(out)


def found(report, check):
    """The listed items of one problem kind."""
    return [item for g in report["problems"] if g["check"] == check for item in g["items"]]


def pt_dataset(root, frames, width=H, manifest=True):
    root.mkdir(parents=True)
    names = []
    for i, t in enumerate(frames):
        torch.save(sample_dict(t=t, width=width, seed=i), root / f"song_{i}.pt")
        names.append(f"song_{i}.pt")
    if manifest:
        (root / "manifest.json").write_text(json.dumps({"samples": names, "num_samples": len(names)}))
    return root


def v3_dataset(root, frames, shard_bytes=20_000):
    samples = [(f"song {i}", d, d["metadata"]) for i, t in enumerate(frames)
               for d in [sample_dict(t=t, length=9 + i % 3, seed=i)]]
    write_v3(samples, root, shard_bytes, fingerprint=FP, progress=False)
    return root


def test_clean_pt_dataset_passes_with_stats(tmp_path, capsys):
    frames = [50, 100, 250, 300, 775]
    root = pt_dataset(tmp_path / "pt", frames)
    code, report = run_json(capsys, root, "--bucket-seconds", "5")
    assert code == 0 and report["ok"]
    assert report["format"] == "pt" and report["layout"] == "manifest.json"
    assert report["samples"] == report["samples_read"] == 5 and report["errors"] == 0
    assert [g["check"] for g in report["problems"]] == ["fingerprint"] and report["warnings"] == 1  # .pt: none
    assert report["encoder_width"] == {"width": H, "source": "most common in the dataset"}
    ls = report["lengths"]
    assert ls["count"] == 5 and ls["min_s"] == 2.0 and ls["median_s"] == 10.0 and ls["max_s"] == 31.0
    assert ls["total_hours"] == pytest.approx(sum(frames) / 25 / 3600)
    bins = report["histogram"]["bins"]
    assert report["histogram"]["bucket_seconds"] == 5 and sum(b["count"] for b in bins) == 5
    assert bins[0] == {"lo_s": 0, "hi_s": 5, "count": 2} and bins[-1]["lo_s"] == 30
    code, text, _ = run(capsys, "--dataset-dir", str(root))
    assert code == 0
    assert "Summary: 5 samples (5 read), 0 errors, 1 warnings -> OK" in text
    assert "Length histogram (10 s buckets)" in text and "Padding (batch_size 4" in text and "#" in text


def test_clean_v3_dataset_passes_and_checks_the_model_variant(tmp_path, capsys):
    root = v3_dataset(tmp_path / "v3", [30 + 20 * i for i in range(6)])
    code, report = run_json(capsys, root)
    assert code == 0 and report["errors"] == report["warnings"] == 0 and report["problems"] == []
    assert report["format"] == "v3_sharded" and report["samples_read"] == 6
    assert report["fingerprint"]["model_variant"] == "tiny"
    assert report["encoder_width"] == {"width": H, "source": "index.jsonl header"}
    assert report["lengths"]["count"] == 6 and report["lengths"]["max_s"] == 130 / 25
    code, report = run_json(capsys, root, "--model-variant", "turbo", "--encoder-width", "32")
    assert code == 1
    assert "data has 'tiny', training has 'turbo'" in found(report, "fingerprint")[0]["message"]
    assert found(report, "encoder_width")[0]["message"] == "H_enc = 16 for all samples, expected 32 (--encoder-width)"


def test_planted_pt_problems_are_all_reported_in_one_run(tmp_path, capsys):
    root = pt_dataset(tmp_path / "pt", [40 + 10 * i for i in range(8)])
    nan = torch.load(root / "song_1.pt")
    nan["target_latents"][3, :5] = float("nan")
    torch.save(nan, root / "song_1.pt")
    shape = torch.load(root / "song_2.pt")
    shape["context_latents"] = shape["context_latents"][:, :65]
    torch.save(shape, root / "song_2.pt")
    torch.save(sample_dict(t=60, width=H * 2, seed=3), root / "song_3.pt")
    t_mismatch = torch.load(root / "song_4.pt")
    t_mismatch["context_latents"] = t_mismatch["context_latents"][:-5]
    torch.save(t_mismatch, root / "song_4.pt")
    (root / "song_5.pt").write_bytes(b"not a zip file at all")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["samples"].append("song_6.pt")  # listed twice
    (root / "manifest.json").write_text(json.dumps(manifest))

    code, report = run_json(capsys, root)
    assert code == 1 and not report["ok"]
    assert report["samples"] == 9 and report["samples_read"] == 8  # the scan went on past every problem
    nan_item, = found(report, "non_finite")
    assert nan_item["where"].endswith("song_1.pt") and nan_item["sample"] == "song_1"
    assert nan_item["key"] == "target_latents" and nan_item["message"].startswith("5 NaN/Inf")
    assert "fp16 overflow" in nan_item["fix"]
    shape_item, = found(report, "shape")
    assert (shape_item["sample"], shape_item["key"]) == ("song_2", "context_latents")
    assert "[60, 65]" in shape_item["message"] and "[T, 128]" in shape_item["message"]
    width_item, = found(report, "encoder_width")
    assert (width_item["sample"], width_item["message"]) == ("song_3", "H_enc = 32, expected 16")
    t_item, = found(report, "length_mismatch")
    assert (t_item["sample"], t_item["key"]) == ("song_4", "context_latents")
    assert t_item["message"] == "T = 75, but target_latents has T = 80"
    bad_item, = found(report, "unreadable")
    assert bad_item["sample"] == "song_5" and "cannot be read by torch.load" in bad_item["message"]
    dup_item, = found(report, "duplicate_key")
    assert dup_item["sample"] == "song_6" and "listed 2 times" in dup_item["message"]
    assert "manifest.json" in dup_item["fix"]
    assert report["errors"] == 6
    assert report["lengths"]["count"] == 8

    code, text, _ = run(capsys, "--dataset-dir", str(root), "--encoder-width", str(H))
    assert code == 1 and "6 errors" in text
    assert text.index("ERROR") < text.index("WARNING")  # errors listed first
    assert f"{root / 'song_1.pt'}: sample 'song_1': key 'target_latents': 5 NaN/Inf" in text


def test_manifest_entry_without_file_is_reported_and_the_rest_scanned(tmp_path, capsys):
    root = pt_dataset(tmp_path / "pt", [40, 50, 60])
    (root / "song_1.pt").unlink()
    code, report = run_json(capsys, root)
    assert code == 1 and report["samples_read"] == 2
    assert "'song_1.pt' not found" in found(report, "missing_file")[0]["message"]


def test_v3_corrupted_byte_and_truncated_shard_are_errors_not_crashes(tmp_path, capsys):
    root = v3_dataset(tmp_path / "v3", [40 + 5 * i for i in range(8)], shard_bytes=30_000)
    entries = [json.loads(line) for line in (root / INDEX_NAME).read_text().splitlines()[1:]]
    assert len({e["shard"] for e in entries}) > 1
    with open(root / entries[1]["shard"], "r+b") as f:  # flip one byte of sample 1's target_latents
        f.seek(entries[1]["tensors"]["target_latents"][2] + 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    last = entries[-1]
    os.truncate(root / last["shard"], last["offset"] + 100)  # cuts into the last sample

    code, report = run_json(capsys, root)
    assert code == 1 and report["samples"] == 8 and report["samples_read"] == 6
    corrupt, = found(report, "checksum")
    assert corrupt["sample"] == "song 1" and entries[1]["shard"] in corrupt["where"]
    assert corrupt["message"] == "is corrupted; found a xxh3_64 checksum that differs from index.jsonl"
    shard, = found(report, "shard_size")
    assert shard["where"].endswith(last["shard"]) and "truncated" in shard["message"]
    cut, = found(report, "unreadable")
    assert cut["sample"] == "song 7" and "truncated" in cut["message"]
    assert report["errors"] == 3


def test_warnings_alone_do_not_fail(tmp_path, capsys):
    root = tmp_path / "pt"
    root.mkdir()
    d = sample_dict(t=60, seed=0)
    d["attention_mask"][-3:] = 0
    d["encoder_attention_mask"] = torch.tensor([1, 0, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bfloat16)
    d["context_latents"][:, 100] = 0
    torch.save(d, root / "a.pt")
    torch.save(sample_dict(t=10, seed=1), root / "short.pt")
    torch.save(sample_dict(t=60, seed=0), root / "copy.pt")  # same tensors as a.pt was before the edits
    torch.save(sample_dict(t=60, seed=0), root / "copy2.pt")
    code, report = run_json(capsys, root, "--min-seconds", "1")
    assert code == 0 and report["errors"] == 0 and report["layout"] == "scan"
    checks = {g["check"]: g["count"] for g in report["problems"]}
    assert checks == {"attention_mask_padding": 1, "valid_first": 1, "chunk_mask": 1, "too_short": 1,
                      "duplicate_content": 1, "fingerprint": 1}
    assert found(report, "too_short")[0]["sample"] == "short"
    assert "same tensors as sample 'copy'" in found(report, "duplicate_content")[0]["message"]


def test_listing_is_capped_per_kind(tmp_path, capsys):
    root = pt_dataset(tmp_path / "pt", [10] * 5, manifest=False)
    code, text, _ = run(capsys, "--dataset-dir", str(root), "--max-listed", "2")
    assert code == 0 and "WARNING too_short (5):" in text and "... and 3 more" in text
    code, report = run_json(capsys, root, "--max-listed", "2")
    group, = [g for g in report["problems"] if g["check"] == "too_short"]
    assert group["count"] == 5 and len(group["items"]) == 2 and group["more"] == 3


def test_padding_bucketed_beats_random_batches_for_a_wide_length_spread(tmp_path, capsys):
    frames = [25 * s for s in (2, 3, 5, 8, 20, 30, 45, 60, 90, 120, 150, 180, 200, 230, 2, 4, 60, 61)]
    root = pt_dataset(tmp_path / "pt", frames, manifest=False)
    code, report = run_json(capsys, root, "--batch-size", "4", "--bucket-seconds", "10")
    pad = report["padding"]
    assert code == 0 and pad["samples"] == len(frames) and pad["real_frames"] == sum(frames)
    assert pad["pad_fraction"] < pad["naive_pad_fraction"]
    assert set(pad) >= {"batches", "padded_frames", "naive_padded_frames", "max_batch_frames", "oversize_samples"}
    _, report = run_json(capsys, root, "--max-seconds", "30", "--max-frames-per-batch", "1500")
    assert report["padding"]["real_frames"] == sum(min(f, 750) for f in frames)
    assert report["padding"]["max_batch_frames"] <= 1500
    assert report["settings"]["max_seconds"] == 30


def test_pure_check_reports_every_problem_of_one_sample():
    d = sample_dict(t=30, seed=0)
    d["target_latents"] = d["target_latents"].to(torch.int32)
    d["attention_mask"] = torch.full((30,), 2.0)
    d["encoder_hidden_states"][0, 0] = float("inf")
    del d["context_latents"]
    problems = check_sample(d, "x.pt", "x")
    assert {(p.check, p.key) for p in problems} == {
        ("missing_key", "context_latents"), ("dtype", "target_latents"), ("mask_values", "attention_mask"),
        ("non_finite", "encoder_hidden_states")}
    assert all(p.severity == "error" and p.where == "x.pt" and p.sample == "x" and p.fix for p in problems)
    assert check_sample([1, 2], "y.pt", "y")[0].check == "not_a_sample"
    empty = sample_dict(t=0, seed=0)
    assert [p.check for p in check_sample(empty, "e.pt", "e")] == ["empty"]
    assert check_sample(sample_dict(t=30, seed=0), "ok.pt", "ok") == []


def test_bad_path_and_bad_options_exit_2_without_traceback(tmp_path, capsys):
    code, out, err = run(capsys, "--dataset-dir", str(tmp_path / "nope"))
    assert code == 2 and out == "" and "dataset directory does not exist" in err and "Traceback" not in err
    (tmp_path / "other").mkdir()
    code, _, err = run(capsys, "--dataset-dir", str(tmp_path / "other"))
    assert code == 2 and "not a dataset directory" in err
    (tmp_path / "other" / "song.txt").write_text("junk")  # a file where the directory belongs
    code, _, err = run(capsys, "--dataset-dir", str(tmp_path / "other" / "song.txt"))
    assert code == 2 and "is a file" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        main(["--dataset-dir", str(tmp_path), "--batch-size", "0"])
    assert exc.value.code == 2 and "--batch-size must be >= 1" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "acestep_ft.data.validate", "--dataset-dir", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
