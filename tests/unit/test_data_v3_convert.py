"""scripts/convert_pt_to_v3.py: an official-style .pt directory becomes a bit-identical v3 dataset, or exit 1 (2 for
a wrong argument)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from acestep_ft.data.pt_format import REQUIRED_KEYS
from acestep_ft.data.v3_reader import V3Directory, detect_format
from test_data_v3 import H, sample_dict

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "convert_pt_to_v3.py"
spec = importlib.util.spec_from_file_location("convert_pt_to_v3", SCRIPT)
convert_pt_to_v3 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert_pt_to_v3)


def official_dir(root: Path, n: int = 4) -> list[dict]:
    """Official layout: tensors in a subfolder, manifest.json listing them; bf16 and fp32 files mixed."""
    (root / "tensors").mkdir(parents=True)
    written = []
    for i in range(n):
        d = sample_dict(t=12 + 5 * i, dtype=torch.float32 if i == 2 else torch.bfloat16, seed=i)
        d["metadata"]["filename"] = f"song.{i}.wav"
        torch.save(d, root / "tensors" / f"song.{i}.pt")
        written.append(d)
    manifest = {"metadata": {"name": "tiny", "num_samples": n},
                "samples": [f"tensors/song.{i}.pt" for i in range(n)], "num_samples": n}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return written


def test_convert_is_bit_identical_and_keeps_dtypes(tmp_path, capsys):
    written = official_dir(tmp_path / "pt")
    assert detect_format(tmp_path / "pt") == "pt"
    rc = convert_pt_to_v3.main(["--src", str(tmp_path / "pt"), "--dst", str(tmp_path / "v3"), "--shard-mb", "0.01",
                                "--model-variant", "turbo", "--no-progress"])
    assert rc == 0
    assert "converted 4 samples" in capsys.readouterr().out
    src = V3Directory(tmp_path / "v3", H)
    assert src.keys == [f"song.{i}" for i in range(4)] and len(src.shards) > 1
    assert src.fingerprint["model_variant"] == "turbo" and src.fingerprint["settings"]["source"] == "pt"
    for i, d in enumerate(written):
        sample = src[i]
        for k in REQUIRED_KEYS:
            got = getattr(sample, k)
            assert got.dtype == d[k].dtype and torch.equal(got, d[k]), k
        assert src.metadata(i) == d["metadata"]


def test_convert_fails_with_the_data_error_naming_the_file(tmp_path, capsys):
    written = official_dir(tmp_path / "pt", n=3)
    written[1]["encoder_hidden_states"][0, 0] = float("inf")
    torch.save(written[1], tmp_path / "pt" / "tensors" / "song.1.pt")
    with pytest.raises(SystemExit) as stopped:
        convert_pt_to_v3.main(["--src", str(tmp_path / "pt"), "--dst", str(tmp_path / "v3"), "--no-progress"])
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and "Traceback" not in err
    assert "sample 'song.1'" in err and "non-finite" in err and "song.1.pt" in err and "Fix:" in err
    assert not (tmp_path / "v3" / "index.jsonl").exists()
    with pytest.raises(SystemExit) as stopped:  # a wrong argument: usage error
        convert_pt_to_v3.main(["--src", str(tmp_path / "nothing"), "--dst", str(tmp_path / "v3"), "--no-progress"])
    assert stopped.value.code == 2 and "--src" in capsys.readouterr().err


def test_convert_keeps_both_condition_sets_and_verifies_each(tmp_path, capsys):
    from acestep_ft.config import Conditions
    from acestep_ft.data import ConditionWidths
    from test_data_conditions import D, inputs_dict

    (tmp_path / "pt").mkdir()
    written = [inputs_dict(t=10 + i, seed=i, outputs=True, id_dtype=torch.int32, token_ids=True) for i in range(2)]
    for i, d in enumerate(written):
        torch.save(d, tmp_path / "pt" / f"s{i}.pt")
    rc = convert_pt_to_v3.main(["--src", str(tmp_path / "pt"), "--dst", str(tmp_path / "v3"), "--no-progress"])
    assert rc == 0 and "round trip verified" in capsys.readouterr().out
    ins = V3Directory(tmp_path / "v3", ConditionWidths(H, D, 100), conditions=Conditions.encoder_inputs)
    assert ins.carried == [Conditions.encoder_outputs, Conditions.encoder_inputs]
    assert torch.equal(ins[1].lyric_token_ids, written[1]["lyric_token_ids"].long())
    assert torch.equal(ins[1].text_token_ids, written[1]["text_token_ids"])
    assert torch.equal(V3Directory(tmp_path / "v3", H)[0].encoder_hidden_states, written[0]["encoder_hidden_states"])
