"""A crafted or inconsistent index.jsonl is refused at open with a DataError, never served as data; a shard truncated
while the dataset is open is a DataError on read, never a SIGBUS."""

import json
import shutil
import signal
import subprocess
import sys

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


# Runs in a child process, so that a regression (SIGBUS from touching a mapped page past the file's end) fails the test
# instead of killing pytest. Prints one line per outcome; exit status 0 only when both reads raised a DataError.
TRUNCATE_AND_READ = """
import os, sys
from acestep_ft.data import DataError
from acestep_ft.data.v3_reader import V3Directory
root, use_mmap, read_first = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
src = V3Directory(root, int(sys.argv[4]), use_mmap=use_mmap)
if read_first:
    src[0]  # maps (or opens) the shard at its full size
shard = os.path.join(root, "shard-00000.tar")
os.truncate(shard, os.path.getsize(shard) // 2)
print("sample 0 still reads:", src[0].key)
raised = 0
for read in (src.__getitem__, src.metadata):
    try:
        read(4)
        print("no error from", read.__name__)
    except DataError as exc:
        raised += 1
        print("DataError:", exc)
sys.exit(0 if raised == 2 else 1)
"""


@pytest.mark.parametrize("use_mmap", [True, False], ids=["mmap", "pread"])
@pytest.mark.parametrize("read_first", [True, False], ids=["after_first_read", "before_first_read"])
def test_shard_truncated_while_open_is_a_data_error_not_sigbus(tmp_path, use_mmap, read_first):
    root, written = write(tmp_path, n=5, shard_bytes=10**9)  # one shard; sample 4 lies in its second half
    proc = subprocess.run([sys.executable, "-c", TRUNCATE_AND_READ, str(root), str(int(use_mmap)),
                           str(int(read_first)), str(H)], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode != -signal.SIGBUS, f"reader died with SIGBUS:\n{out}"
    assert proc.returncode == 0, out
    assert f"sample 0 still reads: {written[0][0]}" in out
    errors = [line for line in out.splitlines() if line.startswith("DataError:")]
    assert len(errors) == 2, out
    for line in errors:
        assert f"{root / 'shard-00000.tar'}: sample '{written[4][0]}': shard truncated while the dataset was open" \
            in line and "expected at least" in line and "Fix: restore the shard" in line, line
