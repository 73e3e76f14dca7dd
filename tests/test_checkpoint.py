"""Checkpoints: round trip, atomic writes that never destroy the last good file, clear errors, RNG states."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from dynadiag.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _state(value: float = 1.0) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "step": 7, "config": {"sparsity": 0.9}, "rng": capture_rng_state()}


def test_round_trip_and_format_version(tmp_path):
    path = save_checkpoint(tmp_path / "checkpoints" / "last.pt", _state(2.0))
    state = load_checkpoint(path)
    assert state["format_version"] == FORMAT_VERSION and state["step"] == 7
    assert torch.equal(state["model"]["w"], torch.full((3,), 2.0))
    # a run directory resolves to checkpoints/last.pt
    assert load_checkpoint(tmp_path)["step"] == 7


class _Unpicklable:
    def __reduce__(self):
        raise OSError("No space left on device")  # what a full disk looks like half-way through torch.save


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(1.0))
    bad = _state(5.0)
    bad["extra"] = _Unpicklable()
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, bad)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]  # no temp files left behind


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a dynadiag checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    newer = _state()
    save_checkpoint(tmp_path / "new.pt", newer)
    state = torch.load(tmp_path / "new.pt", weights_only=False)
    state["format_version"] = FORMAT_VERSION + 1
    torch.save(state, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="newer than this code"):
        load_checkpoint(tmp_path / "new.pt")


def test_rng_state_restores_every_generator(tmp_path):
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    save_checkpoint(tmp_path / "rng.pt", {"model": {}, "step": 0, "config": {}, "rng": state})
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[0] == again[0] and expected[1] == again[1] and torch.equal(expected[2], again[2])
