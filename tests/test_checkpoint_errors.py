"""Corrupt or foreign checkpoints: the error says what the file is (issue 16 item 5, SPEC §12).

Every message names the file, and none suggests ``weights_only=False`` (which PyTorch's own message
does): unpickling arbitrary objects can run code, and no tofa_fast checkpoint needs it.
"""

from __future__ import annotations

import collections
import os
import zipfile

import pytest
import torch

from tofa_fast.train.checkpoint import FORMAT, load_checkpoint, save_atomic


@pytest.fixture
def good(tmp_path) -> str:
    path = str(tmp_path / "good.pt")
    save_atomic({"format": FORMAT, "model": {"w": torch.randn(64, 64)}, "epoch": 3}, path)
    return path


def _refused(path, pattern: str) -> str:
    with pytest.raises(ValueError, match=pattern) as info:
        load_checkpoint(str(path))
    message = str(info.value)
    assert repr(str(path)) in message, "the message names the file"
    assert "weights_only" not in message
    return message


def test_a_valid_checkpoint_loads(good):
    state = load_checkpoint(good)
    assert state["epoch"] == 3 and state["model"]["w"].shape == (64, 64)


def test_missing_and_empty_files(tmp_path):
    _refused(tmp_path / "nope.pt", "does not exist")
    (tmp_path / "empty.pt").write_bytes(b"")
    _refused(tmp_path / "empty.pt", r"is empty \(0 bytes\)")


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b"step 100 loss 0.3\n", r"text, beginning 'step 100 loss"),
        (bytes(range(200, 256)) * 4, r"it begins with the bytes b'\\xc8\\xc9"),
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "it begins with the bytes"),
    ],
    ids=["text", "random-bytes", "png"],
)
def test_not_a_checkpoint_at_all(tmp_path, content, what):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    _refused(path, rf"is not a checkpoint at all: not a PyTorch file \({what}")


def test_a_zip_archive_that_pytorch_did_not_write(tmp_path):
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
        archive.writestr("weights.npy", b"\0" * 10)
    _refused(path, r"not a checkpoint at all: a zip archive, but not one PyTorch wrote .*'notes.txt', 'weights.npy'")


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.99])
def test_a_truncated_checkpoint(tmp_path, good, fraction):
    data = open(good, "rb").read()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: int(len(data) * fraction)])
    _refused(
        path,
        rf"is truncated: a PyTorch file whose end-of-archive record is missing, cut short at {path.stat().st_size:,} bytes",
    )


def test_a_truncated_legacy_format_file(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"format": FORMAT, "w": torch.randn(100)}, path, _use_new_zipfile_serialization=False)
    assert load_checkpoint(str(path))["w"].shape == (100,)  # the legacy format itself still loads
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _refused(path, "is truncated: a legacy-format PyTorch file")


def test_damaged_bytes_inside_a_checkpoint(tmp_path, good):
    """PyTorch does not check the CRC of tensor records: damaged weights would load silently."""
    data = bytearray(open(good, "rb").read())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(16)
    path = tmp_path / "damaged.pt"
    path.write_bytes(bytes(data))
    _refused(path, r"is a PyTorch file but it is corrupted: record '.*data/0' fails its checksum")


def test_a_plain_state_dict(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(collections.OrderedDict((f"layer{i}.weight", torch.zeros(2)) for i in range(5)), path)
    _refused(
        path,
        r"is a PyTorch file, but not a tofa_fast checkpoint \(no format tag 'tofa_fast.checkpoint/\d+'\): "
        r"it holds a plain state dict of 5 tensors \('layer0.weight', 'layer1.weight', 'layer2.weight', …\)",
    )


@pytest.mark.parametrize(
    ("obj", "what"),
    [
        (torch.zeros(2, 3), r"a single tensor of shape \(2, 3\)"),
        ([1, 2, 3], "a list of 3 items"),
        ({"epoch": 1, "model": {}}, "a dict with keys 'epoch', 'model'"),
        ({}, "an empty dict"),
        ({"format": 7}, "a dict with keys 'format'"),
        ({"format": "ofa.checkpoint/1"}, "a dict with keys 'format'"),
    ],
)
def test_other_pytorch_files(tmp_path, obj, what):
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    _refused(path, rf"not a tofa_fast checkpoint \(no format tag .*\): it holds {what}")


def test_a_pickled_model_is_refused_without_running_it(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"format": FORMAT, "net": torch.nn.Linear(2, 2)}, path)
    message = _refused(path, r"not a tofa_fast checkpoint: it pickles Python objects \(.*torch.nn.*Linear")
    assert "safe weights-only load refuses" in message


def test_a_checkpoint_of_another_format_version(tmp_path, good):
    state = load_checkpoint(good)
    prefix = FORMAT.rsplit("/", 1)[0]
    for other in (f"{prefix}/0", f"{prefix}/99", f"{prefix}/2-beta"):
        path = tmp_path / "other_version.pt"
        torch.save({**state, "format": other}, path)
        _refused(path, rf"is a tofa_fast checkpoint of format '{other}', but this tofa_fast reads '{FORMAT}'")


def test_a_directory_is_not_a_checkpoint(tmp_path):
    os.mkdir(tmp_path / "dir.pt")
    _refused(tmp_path / "dir.pt", "is a folder, not a checkpoint file")
