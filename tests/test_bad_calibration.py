"""Calibration files: every damaged, foreign or outdated file is refused with one error naming it."""

import json
import os

import pytest
import safetensors.torch
import torch
from torch import nn

import qpass
from qpass.calibration import CalibrationFileError


def _calibration(samples: int = 256) -> qpass.Calibration:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    torch.manual_seed(0)
    return qpass.calibrate(model, [torch.randn(2, 5, 4), torch.randn(1, 3, 4)], samples=samples)


@pytest.fixture
def saved(tmp_path):
    """(path, bytes, header end) of a saved calibration."""
    path = tmp_path / "calib.safetensors"
    _calibration().save(path)
    data = path.read_bytes()
    return path, data, 8 + int.from_bytes(data[:8], "little")


def _load_bytes(path, data: bytes):
    path.write_bytes(data)
    return qpass.Calibration.load(path)


def _assert_same(a: qpass.Calibration, b: qpass.Calibration) -> None:
    assert list(a) == list(b)
    for k in a:
        for field in ("absmax", "min", "max", "samples"):
            x, y = getattr(a[k], field), getattr(b[k], field)
            assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y)), (k, field)
        assert (a[k].tokens, a[k].nonfinite) == (b[k].tokens, b[k].nonfinite)


def test_roundtrip_is_exact_for_every_field(tmp_path):
    calib = _calibration()
    calib.save(tmp_path / "c.safetensors")
    _assert_same(qpass.Calibration.load(tmp_path / "c.safetensors"), calib)
    no_samples = _calibration(samples=0)
    assert no_samples["0"].samples is None
    no_samples.save(tmp_path / "n.safetensors")
    _assert_same(qpass.Calibration.load(tmp_path / "n.safetensors"), no_samples)


def test_roundtrip_keeps_nonfinite_counts(tmp_path, caplog):
    calib = qpass.calibrate(nn.Linear(3, 3), [torch.tensor([[1.0, float("nan"), float("inf")]])])
    calib.save(tmp_path / "c.safetensors")
    loaded = qpass.Calibration.load(tmp_path / "c.safetensors")
    assert loaded[""].nonfinite == 2
    _assert_same(loaded, calib)


def test_header_length_starting_like_a_pickle_still_loads(tmp_path):
    """A header length whose low byte is 0x80 (a pickle's first byte) is still a calibration file."""
    path = tmp_path / "c.safetensors"
    for k in range(1, 400):
        stats = qpass.ChannelStats(torch.ones(2), -torch.ones(2), torch.ones(2), tokens=k)
        calib = qpass.Calibration({"a" * k: stats})
        calib.save(path)
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    _assert_same(qpass.Calibration.load(path), calib)


def test_empty_calibration_roundtrips(tmp_path):
    qpass.Calibration({}).save(tmp_path / "c.safetensors")
    assert len(qpass.Calibration.load(tmp_path / "c.safetensors")) == 0


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    _calibration().save(path)
    before = path.read_bytes()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        _calibration(samples=0).save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["c.safetensors"]  # no temp file left


def test_every_flipped_data_byte_is_a_checksum_error(saved):
    path, data, start = saved
    assert len(data) - start > 100
    for i in range(start, len(data)):
        flipped = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
        with pytest.raises(CalibrationFileError, match="checksum mismatch: the file is corrupt"):
            _load_bytes(path, flipped)


def test_every_flipped_header_byte_is_refused(saved):
    path, data, start = saved
    for i in range(start):
        for bit in (0x01, 0x80):
            flipped = data[:i] + bytes([data[i] ^ bit]) + data[i + 1 :]
            with pytest.raises(CalibrationFileError, match="calib.safetensors: "):
                _load_bytes(path, flipped)


@pytest.mark.parametrize("where", [1, 7, 8, 9, "header", "header_end", "data", -1])
def test_truncated_file_is_refused(saved, where):
    path, data, start = saved
    cut = {"header": start // 2, "header_end": start, "data": (start + len(data)) // 2, -1: len(data) - 1}.get(where, where)
    with pytest.raises(CalibrationFileError, match=r"calib\.safetensors: truncated"):
        _load_bytes(path, data[:cut])


def test_empty_file_is_refused(tmp_path):
    with pytest.raises(CalibrationFileError, match=r"calib\.safetensors: empty file \(0 bytes\)"):
        _load_bytes(tmp_path / "calib.safetensors", b"")


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_are_refused(tmp_path, seed):
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    with pytest.raises(CalibrationFileError, match=r"calib\.safetensors: "):
        _load_bytes(tmp_path / "calib.safetensors", noise.numpy().tobytes())


def test_text_file_is_refused(tmp_path):
    with pytest.raises(CalibrationFileError, match=r"notes\.txt: not a qpass calibration file"):
        _load_bytes(tmp_path / "notes.txt", b"absmax min max: these are my notes\n")


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"weight": torch.ones(3, 3)}, path, metadata={"format": "pt"})
    with pytest.raises(CalibrationFileError, match=r"model\.safetensors: not a qpass calibration file"):
        qpass.Calibration.load(path)


def test_format_1_torch_save_file_says_how_to_recalibrate(tmp_path):
    """A version 1 file, written as qpass wrote it: torch.save of {"version": 1, "stats": ...}."""
    calib = _calibration()
    payload = {"version": 1, "stats": {k: v.to_dict() for k, v in calib.items()}}
    torch.save(payload, tmp_path / "calib.pt")
    with pytest.raises(
        CalibrationFileError,
        match=r"calib\.pt: a torch\.save file \(qpass calibration format 1.*recalibrate .*"
        r"qpass\.calibrate\(model, batches\)\.save\(path\)",
    ):
        qpass.Calibration.load(tmp_path / "calib.pt")


def test_newer_version_is_refused_naming_it(saved):
    path, data, start = saved
    header = json.loads(data[8:start])
    meta = header.pop("__metadata__")
    tensors = safetensors.torch.load(data)
    safetensors.torch.save_file(tensors, path, metadata={**meta, "version": "3"})
    with pytest.raises(CalibrationFileError, match=r"calib\.safetensors: calibration format version 3, newer than"):
        qpass.Calibration.load(path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        qpass.Calibration.load(tmp_path / "nowhere.safetensors")


def test_error_is_a_value_error():
    assert issubclass(CalibrationFileError, ValueError)
