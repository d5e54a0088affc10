"""Atomic writes: the usual file mode (not mkstemp's 0600), and a failed write leaves the old file and no
temporary behind."""

from __future__ import annotations

import os

import pytest
import torch

from adkit.core import files
from adkit.run.engine import save_checkpoint


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_results_and_checkpoints_get_the_usual_mode(tmp_path, umask_022):
    files.write_json(tmp_path / "metrics.json", {"a": 1})
    save_checkpoint(tmp_path / "checkpoint.pt", {"format": 0})
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "checkpoint.pt").stat().st_mode & 0o777 == 0o644


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": 0, "weights": torch.ones(2)})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint(path, {"format": 0, "bad": Unpicklable()})
    assert torch.equal(torch.load(path, weights_only=False)["weights"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
