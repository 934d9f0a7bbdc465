"""The v3 packed format: lossless round trip, webdataset compatibility, crash safety and every corruption path."""

import json
import os
import pickle
import tarfile

import pytest
import torch

from conftest import sample_dict
from acestep_ft.data import DataError
from acestep_ft.data.dataset import SampleSource
from acestep_ft.data.fingerprint import make_fingerprint
from acestep_ft.data.v3_reader import INDEX_NAME, V3Directory, detect_format
from acestep_ft.data.v3_writer import safe_key, write_v3

H = 16
FIELDS = ("target_latents", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "context_latents")
NAMES = ["song.one", "dir/two", "drei ü", "x" * 120, "plain_5"]
FP = make_fingerprint("tiny", "abc", None, None, None, {"max_duration": 240})


def triples(n: int = 5, dtype=torch.bfloat16):
    data = [sample_dict(t=10 + 7 * i, length=9 + i, dtype=dtype, seed=i) for i in range(n)]
    return [(NAMES[i % len(NAMES)] + ("" if i < len(NAMES) else str(i)), d, d["metadata"]) for i, d in enumerate(data)]


def write(tmp_path, n=5, dtype=torch.bfloat16, shard_bytes=20_000, **kw):
    written = triples(n, dtype)
    write_v3(written, tmp_path / "v3", shard_bytes, fingerprint=FP, progress=False, **kw)
    return tmp_path / "v3", written


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("use_mmap", [True, False])
def test_round_trip_every_field_dtype_and_metadata(tmp_path, dtype, use_mmap):
    root, written = write(tmp_path, dtype=dtype)
    src = V3Directory(root, H, use_mmap=use_mmap)
    assert isinstance(src, SampleSource)
    assert len(src) == 5 and src.keys == [name for name, _, _ in written]
    assert src.lengths == [10 + 7 * i for i in range(5)] and src.cond_lengths == [9 + i for i in range(5)]
    assert len(src.shards) > 1 and src.shard_of(0) == "shard-00000.tar"
    assert src.location(4).startswith(str(root / src.shard_of(4)))
    assert src.fingerprint == FP
    assert src.nbytes == sum(d[f].numel() * d[f].element_size() for _, d, _ in written for f in FIELDS)
    for i, (name, d, meta) in enumerate(written):
        sample = src[i]
        assert sample.key == name
        for f in FIELDS:
            got = getattr(sample, f)
            assert got.dtype == dtype and got.shape == d[f].shape and torch.equal(got, d[f]), (name, f)
        assert src.metadata(i) == meta
    assert src[-1].key == written[-1][0]
    with pytest.raises(IndexError):
        src[5]


def test_index_header_and_safe_keys(tmp_path):
    root, written = write(tmp_path)
    lines = (root / INDEX_NAME).read_text().splitlines()
    header, entries = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    assert header["format"] == "acestep-ft-v3" and header["num_samples"] == 5 and header["encoder_width"] == H
    assert sum(s["samples"] for s in header["shards"]) == 5
    keys = [e["key"] for e in entries]
    assert len(set(keys)) == 5 and all("." not in k and "/" not in k and len(k) <= 80 for k in keys)
    assert [e["name"] for e in entries] == [name for name, _, _ in written]
    assert entries[0]["duration_s"] == 10 / 25 and entries[0]["caption_sha1"] and entries[0]["T"] == 10
    assert safe_key("a.b") != safe_key("a%2Eb")


def test_plain_webdataset_streams_the_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    from safetensors.torch import load

    root, written = write(tmp_path)
    shards = sorted(str(p) for p in root.glob("shard-*.tar"))
    got = list(wds.WebDataset(shards, shardshuffle=False))
    assert len(got) == 5
    for item, (name, d, meta) in zip(got, written):
        assert item["__key__"] == safe_key(name)
        tensors = load(item["safetensors"])
        assert all(torch.equal(tensors[f], d[f]) and tensors[f].dtype == d[f].dtype for f in FIELDS)
        assert json.loads(item["json"]) == {"name": name, "metadata": meta}
    with tarfile.open(shards[0]) as tar:  # plain tar tools see <key>.<ext> members, uncompressed
        assert tar.getnames()[0].endswith(".safetensors")


def test_truncated_shard_is_refused_at_open(tmp_path):
    root, _ = write(tmp_path)
    shard = root / "shard-00001.tar"
    os.truncate(shard, shard.stat().st_size - 512)
    with pytest.raises(DataError, match=r"shard-00001\.tar.*truncated.*Fix: re-run"):
        V3Directory(root, H)
    shard.unlink()
    with pytest.raises(DataError, match=r"shard-00001\.tar.*missing"):
        V3Directory(root, H)


def test_flipped_byte_is_detected_on_read_naming_shard_and_key(tmp_path):
    root, written = write(tmp_path)
    entry = json.loads((root / INDEX_NAME).read_text().splitlines()[2])  # sample 1
    flip_byte(root / entry["shard"], entry["tensors"]["target_latents"][2] + 3)
    for use_mmap in (True, False):
        src = V3Directory(root, H, use_mmap=use_mmap)
        src[0]
        with pytest.raises(DataError, match=rf"{entry['shard']}: sample '{written[1][0]}' is corrupted.*Fix"):
            src[1]
    unchecked = V3Directory(root, H, verify_checksums=False)[1]
    assert not torch.equal(unchecked.target_latents, written[1][1]["target_latents"])


def test_missing_index_and_interrupted_write_are_refused(tmp_path):
    with pytest.raises(DataError, match="is not a v3 dataset.*no index.jsonl"):
        V3Directory(tmp_path, H)

    def dies_midway():
        yield from triples(3)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_v3(dies_midway(), tmp_path / "v3", 20_000, fingerprint=FP, progress=False)
    assert not (tmp_path / "v3" / INDEX_NAME).exists() and not any((tmp_path / "v3").glob("shard-*"))
    with pytest.raises(DataError, match="no index.jsonl"):
        V3Directory(tmp_path / "v3", H)

    root, _ = write(tmp_path, overwrite=True)  # a killed write: complete shards, no index
    (root / INDEX_NAME).unlink()
    with pytest.raises(DataError, match="did not finish"):
        V3Directory(root, H)
    with pytest.raises(DataError, match="did not finish"):
        detect_format(root)


def test_existing_dataset_needs_overwrite_and_foreign_dirs_are_refused(tmp_path):
    root, _ = write(tmp_path, n=5)
    with pytest.raises(DataError, match="already holds a v3 dataset.*overwrite"):
        write(tmp_path, n=2)
    assert len(V3Directory(root, H)) == 5
    write(tmp_path, n=2, overwrite=True)
    assert len(V3Directory(root, H)) == 2 and not (root / "shard-00002.tar").exists()
    (tmp_path / "pts").mkdir()
    torch.save(sample_dict(10), tmp_path / "pts" / "a.pt")
    with pytest.raises(DataError, match="not part of a v3 dataset.*a.pt"):
        write_v3(triples(1), tmp_path / "pts", fingerprint=FP, progress=False, overwrite=True)


def test_encoder_width_mismatch_is_refused_at_open(tmp_path):
    root, _ = write(tmp_path)
    with pytest.raises(DataError, match=r"width does not match.*found H_enc = 16; expected H_enc = 32"):
        V3Directory(root, 32)


@pytest.mark.parametrize("problem, match", [
    (lambda d: d.update(context_latents=d["context_latents"][:, :65]), "context_latents.*wrong shape"),
    (lambda d: d["target_latents"].__setitem__((0, 0), float("nan")), "target_latents.*non-finite"),
    (lambda d: d.pop("attention_mask"), "attention_mask.*missing"),
    (lambda d: d.update(encoder_hidden_states=torch.zeros(9, 8)), "width differs from the first sample"),
])
def test_bad_samples_are_refused_on_write_naming_the_sample(tmp_path, problem, match):
    written = triples(3)
    problem(written[1][1])
    with pytest.raises(DataError, match=f"sample 'dir/two'.*{match}"):
        write_v3(written, tmp_path / "v3", fingerprint=FP, progress=False)
    assert not (tmp_path / "v3" / INDEX_NAME).exists()


def test_duplicate_names_are_refused(tmp_path):
    written = triples(2)
    written[1] = (written[0][0], *written[1][1:])
    with pytest.raises(DataError, match="not unique"):
        write_v3(written, tmp_path / "v3", fingerprint=FP, progress=False)


def test_pickle_and_fork_reopen_the_shards(tmp_path):
    root, written = write(tmp_path)
    src = V3Directory(root, H)
    assert torch.equal(src[3].context_latents, written[3][1]["context_latents"])  # parent maps shard 1
    clone = pickle.loads(pickle.dumps(src))
    assert clone.keys == src.keys and torch.equal(clone[3].target_latents, written[3][1]["target_latents"])
    pid = os.fork()
    if pid == 0:  # child: must map its own shards and read the same bytes
        try:
            ok = torch.equal(src[3].context_latents, written[3][1]["context_latents"]) and src._pid == os.getpid()
        finally:
            os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0


def test_detect_format(tmp_path):
    root, _ = write(tmp_path)
    assert detect_format(root) == "v3_sharded"
    (tmp_path / "pts").mkdir()
    torch.save(sample_dict(10), tmp_path / "pts" / "a.pt")
    assert detect_format(tmp_path / "pts") == "pt"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="not a dataset directory; found notes.txt"):
        detect_format(tmp_path / "other")


def test_checksum_policies_first_read_checks_each_sample_once(tmp_path):
    """dataset.verify_checksums: always re-hashes every read; first_read hashes a sample the first time this process
    reads it and then trusts it (a shard damaged later goes unnoticed for samples already read); never does not hash."""
    root, written = write(tmp_path)
    entry = json.loads((root / INDEX_NAME).read_text().splitlines()[2])  # sample 1
    for use_mmap in (True, False):
        always, once = V3Directory(root, H, "always", use_mmap), V3Directory(root, H, "first_read", use_mmap)
        for src in (always, once):
            src[1]
        calls = []
        original = once._hash
        once._hash = lambda view: calls.append(1) or original(view)
        once[1], once[-len(once) + 1], once[0]
        assert len(calls) == 1  # sample 1 (also as a negative index) was checked already; sample 0 once
    flip_byte(root / entry["shard"], entry["tensors"]["target_latents"][2] + 3)
    with pytest.raises(DataError, match="is corrupted"):
        V3Directory(root, H, "first_read")[1]  # its first read is checked
    with pytest.raises(DataError, match="is corrupted"):
        always[1]
    once[1]  # checked before the damage: trusted
    assert not torch.equal(V3Directory(root, H, "never")[1].target_latents, written[1][1]["target_latents"])
    with pytest.raises(ValueError, match="always, first_read or never"):
        V3Directory(root, H, "sometimes")
