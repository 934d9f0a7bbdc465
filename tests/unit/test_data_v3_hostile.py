"""A crafted or inconsistent index.jsonl is refused at open with a DataError, never served as data."""

import json
import shutil

import pytest

from acestep_ft.data import DataError
from acestep_ft.data.v3_reader import V3Directory
from test_data_v3 import H, write


def rewrite(root, change_header=None, change_entry=None):
    lines = (root / "index.jsonl").read_text().splitlines()
    header, entries = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    if change_header:
        change_header(header)
    if change_entry:
        change_entry(entries[0])
    (root / "index.jsonl").write_text("\n".join(json.dumps(x) for x in [header, *entries]) + "\n")


def set_shape(field, shape):
    def change(e):
        e["tensors"][field][1] = shape
    return change


@pytest.mark.parametrize("change,message", [
    (set_shape("target_latents", [-1]), "not a non-negative integer"),
    (set_shape("target_latents", [-2, -3]), "not a non-negative integer"),
    (set_shape("target_latents", [640]), "wrong size|expected"),
    (lambda e: e.update(T=99999), "disagree with the tensor shapes"),
    (lambda e: e.update(offset=float(e["offset"])), "not a non-negative integer"),
    (lambda e: e.update(json=[10**12, 50]), "beyond the end of its shard"),
    (lambda e: e.update(json=[-5, 50]), "not a non-negative integer"),
    (lambda e: e.update(length=e["length"] + 10**9), "beyond the end of its shard"),
])
def test_inconsistent_sample_entries_are_refused(tmp_path, change, message):
    root, _ = write(tmp_path, n=3)
    rewrite(root, change_entry=change)
    with pytest.raises(DataError, match=rf"line 2 is not a valid sample entry.*({message})"):
        V3Directory(root, H)


def test_shard_names_outside_the_dataset_are_refused(tmp_path):
    root, _ = write(tmp_path, n=3, shard_bytes=10**9)
    outside = tmp_path / "outside.tar"
    shutil.copy(root / "shard-00000.tar", outside)

    def escape(header):
        header["shards"][0]["name"] = "../outside.tar"

    rewrite(root, change_header=escape)
    with pytest.raises(DataError, match="invalid shard entry in the header"):
        V3Directory(root, H)


@pytest.mark.parametrize("entry", ["shard-00000.tar", {"name": "shard-00000.tar"}, {"name": "/tmp/x.tar", "bytes": 1}])
def test_malformed_shard_entries_are_data_errors_not_tracebacks(tmp_path, entry):
    root, _ = write(tmp_path, n=2, shard_bytes=10**9)
    rewrite(root, change_header=lambda h: h.update(shards=[entry]))
    with pytest.raises(DataError, match="invalid shard entry"):
        V3Directory(root, H)
