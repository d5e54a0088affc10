"""Atomic writes: the usual file mode (not mkstemp's 0600), and a failed write leaves the old file and no
temporary behind; a folder's rendered outputs written by one call; history.csv beside a trained detector's
checkpoint."""

from __future__ import annotations

import json
import os

import pytest
import torch

from adkit.core import files
from adkit.core.checkpoints import save_checkpoint


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


def test_write_files_writes_each_content_by_its_kind(tmp_path, umask_022):
    table = files.Table(["path", "score"], [{"path": "a.png", "score": 1.5, "extra": "left out"}, {"path": "b.png"}])
    files.write_files(tmp_path / "out", {"pictures/x.png": b"\x89PNG", "summary.md": "# é\n", "scores.csv": table,
                                         "metrics.json": {"auroc": 0.5, "where": tmp_path}})
    out = tmp_path / "out"
    assert (out / "pictures" / "x.png").read_bytes() == b"\x89PNG"
    assert (out / "summary.md").read_text(encoding="utf-8") == "# é\n"
    assert (out / "scores.csv").read_text().splitlines() == ["path,score", "a.png,1.5", "b.png,"]
    assert (out / "metrics.json").read_text() == json.dumps({"auroc": 0.5, "where": str(tmp_path)}, indent=2) + "\n"
    assert {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()} == {0o644}
    assert not [p for p in out.rglob(".*")]  # no temporary left
    files.write_json(tmp_path / "string.json", "text")  # write_json writes JSON whatever the value
    assert (tmp_path / "string.json").read_text() == '"text"\n'


def test_a_failing_content_leaves_what_came_before_it_whole_and_no_temporary(tmp_path):
    with pytest.raises(TypeError, match="not JSON serialisable"):
        files.write_files(tmp_path, {"a.md": "first", "b.json": {"bad": object()}})
    assert (tmp_path / "a.md").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["a.md"]


def test_a_trained_detectors_checkpoint_has_its_history_beside_it_up_to_that_step(tmp_path):
    from adkit.core.checkpoints import load_checkpoint, write_checkpoint
    from adkit.plugin import Detector

    class Tiny(Detector):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def anomaly_map(self, images):
            return images[:, :1] * self.weight

    history = [{"step": 10, "loss": 0.5}, {"step": 20, "loss": 0.25, "extra": 1.0}]
    write_checkpoint(tmp_path / "checkpoint.pt", Tiny(), {}, None, None, 20, 40, {"category": "x"}, history)
    assert (tmp_path / "history.csv").read_text().splitlines() == ["step,loss,extra", "10,0.5,", "20,0.25,1.0"]
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["history"] == history and payload["step"] == 20 and payload["total_steps"] == 40
    write_checkpoint(tmp_path / "fitted" / "checkpoint.pt", Tiny(), {}, None, None, 0, 1, {}, None)  # a fitted one: none
    assert sorted(p.name for p in (tmp_path / "fitted").iterdir()) == ["checkpoint.pt"]
