"""Two gloo processes on the CPU, launched as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from adkit import api
from adkit.run.config import RunConfig

SCRIPT = """
import sys
from adkit import api
from adkit.core import distributed
from adkit.run.config import RunConfig
out = sys.argv[1]
api.train(RunConfig(detector=["draem:recon_width=4,disc_width=4"], data="synthetic:size=32,n_train=8,n_test=6",
                    category=["wood"], image_size=32, steps=3, batch_size=2, out=out, checkpoint_every=1))
# rank 0 wrote the checkpoint; every rank reads the same final step
from adkit.run.engine import load_checkpoint
from pathlib import Path
print("RANK", distributed.rank(), "WORLD", distributed.world_size(), "STEP",
      load_checkpoint(Path(out) / "wood" / "checkpoint.pt")["step"])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, *args: str, world: int = 2) -> list[str]:
    """Run ``script`` in ``world`` processes wired as torchrun wires them; returns each rank's stdout + stderr."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", script, *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
    return [out + err for out, err in outputs]


def test_two_process_ddp_training(tmp_path):
    outputs = launch(SCRIPT, str(tmp_path / "ddp"))
    assert "RANK 0 WORLD 2 STEP 3" in outputs[0] and "RANK 1 WORLD 2 STEP 3" in outputs[1]
    # only rank 0 wrote files: one checkpoint, one config, one log
    assert len(list((tmp_path / "ddp").rglob("checkpoint.pt"))) == 1
    assert not list((tmp_path / "ddp").rglob("*.tmp"))
    payload = torch.load(tmp_path / "ddp" / "wood" / "checkpoint.pt", weights_only=False)
    assert payload["step"] == 3


TINY = {"data": "synthetic:size=32,n_train=8,n_test=6", "image_size": 32, "batch_size": 2}
METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro", "threshold", "n_test")

EVALUATE = """
import json, sys
from pathlib import Path
from adkit import api
from adkit.core import distributed
from adkit.run.config import RunConfig
out = Path(sys.argv[1])
# a per-pixel Gaussian with the mean scorer: scores far apart between images (a few DRAEM steps leave them
# tied to the sixth digit, where other batchings and thread counts reorder them)
tiny = dict(data="synthetic:size=32,n_train=8,n_test=6", image_size=32, batch_size=2, scorer="mean")
ran = api.run(RunConfig(detector=["pixel-gauss"], category=["wood"], out=str(out / "run"), **tiny))
tested = api.test(RunConfig(out=str(out / "test"), **tiny), out / "run" / "wood" / "checkpoint.pt")
print("RESULT", distributed.rank(), json.dumps({"run": ran, "test": tested}))
"""


def _result_line(stdout: str) -> tuple[int, dict]:
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
    _, rank, payload = line.split(" ", 2)
    return int(rank), json.loads(payload)


def test_metrics_gathered_across_ranks_equal_a_single_process(tmp_path):
    outputs = launch(EVALUATE, str(tmp_path))
    (rank0, main), (rank1, other) = map(_result_line, outputs)
    assert (rank0, rank1) == (0, 1)
    assert other == {"run": [], "test": []}  # rank 1 scored its shard and left reporting to rank 0
    assert main["run"][0]["n_test"] == 6  # every test image counted once: both shards came back
    single = api.test(RunConfig(out=str(tmp_path / "single"), scorer="mean", **TINY),
                      tmp_path / "run" / "wood" / "checkpoint.pt")
    # only rank 0 wrote the per-image scores, once per image, in dataset order; shards are other batchings and
    # thread counts than one process's, so the scores agree to float tolerance, not bit for bit
    rows, single_rows = (list(csv.DictReader((folder / "wood" / "scores.csv").open()))
                         for folder in (tmp_path / "test", tmp_path / "single"))
    assert [(r["path"], r["label"]) for r in rows] == [(r["path"], r["label"]) for r in single_rows]
    scores = np.array([float(r["score"]) for r in rows])
    single_scores = np.array([float(r["score"]) for r in single_rows])
    np.testing.assert_allclose(scores, single_scores, rtol=1e-5)
    # the images' scores lie much further apart than that tolerance: the same ranking, so the same image metrics
    gaps = np.diff(np.sort(single_scores))
    assert gaps.min() > 1e-3 * np.abs(single_scores).max(), "near-tied scores: the ranking would not be robust"
    for key in METRICS:
        tolerance = {"threshold": 1e-5 * abs(single[0]["threshold"]), "pixel_auroc": 1e-3, "pixel_ap": 1e-3,
                     "aupro": 1e-3}.get(key, 1e-9)  # pixel metrics rank thousands of pixels, some nearly tied
        assert main["test"][0][key] == pytest.approx(single[0][key], abs=tolerance), key
        assert main["run"][0][key] == pytest.approx(single[0][key], abs=tolerance), key  # run's own evaluation


BENCH = """
import sys
from adkit import api
from adkit.run.config import RunConfig
api.bench(RunConfig(detector=["draem:recon_width=4,disc_width=4"], data="synthetic:size=32,n_train=8,n_test=6",
                    category=["carpet", "tile", "wood"], image_size=32, batch_size=2, steps=2, out=sys.argv[1]),
          ["post=avgpool:kernel=5,freqmask"])
# leaving the group must stop its threads (else a late gloo thread can abort the exit; see distributed.leave)
import os
from adkit.core import distributed
distributed.leave()
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print("GROUP THREADS LEFT", [t for t in threads if "gloo" in t])
"""


def test_distributed_bench_writes_the_sequential_table(tmp_path):
    outputs = launch(BENCH, str(tmp_path / "dist"))
    assert "bench job 1/3 (rank 0)" in outputs[0] and "bench job 2/3 (rank 1)" in outputs[1]
    # training imported torch._dynamo after the group existed; the group was still freed on leaving
    assert all("GROUP THREADS LEFT []" in out for out in outputs), outputs
    api.bench(RunConfig(detector=["draem:recon_width=4,disc_width=4"], category=["carpet", "tile", "wood"],
                        steps=2, out=str(tmp_path / "seq"), **TINY), ["post=avgpool:kernel=5,freqmask"])
    distributed_rows = json.loads((tmp_path / "dist" / "bench.json").read_text())
    sequential_rows = json.loads((tmp_path / "seq" / "bench.json").read_text())
    assert len(distributed_rows) == len(sequential_rows) == 6
    for d, s in zip(distributed_rows, sequential_rows):
        assert (d["configuration"], d["category"]) == (s["configuration"], s["category"])
        for key in METRICS:
            # the ranks train with one thread each, this process with several: float sums differ in the last bits
            assert d[key] == pytest.approx(s[key], abs=1e-4), (d["category"], key)
    # each job trained once, by one rank, into its own folder
    assert len(list((tmp_path / "dist").rglob("checkpoint.pt"))) == 3
    def table(path):  # the timing rows differ by nature
        return [line for line in path.read_text().splitlines() if not line.startswith(("| train", "| infer"))]

    assert table(tmp_path / "dist" / "bench.md") == table(tmp_path / "seq" / "bench.md")


def test_gather_shards_restores_order_for_uneven_shards(monkeypatch):
    from adkit.core import distributed

    n, world = 7, 3
    full = [torch.arange(n * 2.0).view(n, 2), torch.arange(n)]
    parts_by_rank = []
    for r in range(world):  # what each rank's shard() picks, rank 2 of 3 with 2 of the 7 rows
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts_by_rank.append([t[distributed.shard(n)] for t in full])
    assert [len(p[1]) for p in parts_by_rank] == [3, 2, 2]
    monkeypatch.setattr(distributed, "all_gather_objects", lambda value: parts_by_rank)
    gathered = distributed.gather_shards(parts_by_rank[0], n)
    assert torch.equal(gathered[0], full[0]) and torch.equal(gathered[1], full[1])


FIT_SCRIPT = """
import sys, torch
from pathlib import Path
from adkit.core import distributed
from adkit.core.components import DetectorContext
from adkit.run.engine import TrainSettings, train_detector
from adkit.core.plugins import get_catalog
device = distributed.init_from_environment(torch.device("cpu"))
catalog = get_catalog()
images = torch.rand(7, 3, 32, 32, generator=torch.Generator().manual_seed(0))
out = {}
for spec in ("patchcore:coreset=0.2,partition=50", "padim:features=20"):
    detector = catalog["detector"].create(spec)
    detector.setup(DetectorContext(build=catalog.builder(), image_size=32, device=device))
    train_detector(detector, images, TrainSettings(steps=1, batch_size=2), device,
                   Path(sys.argv[1]) / spec.split(":")[0] / "checkpoint.pt", meta={})
    with torch.inference_mode():
        out[spec] = detector.detect(images[:2]).anomaly_map
    if spec.startswith("patchcore"):
        out["bank"] = detector.memory_bank
torch.save(out, Path(sys.argv[1]) / f"rank{distributed.rank()}-of{distributed.world_size()}.pt")
"""


def test_fitting_shards_images_and_every_rank_holds_the_single_process_state(tmp_path):
    launch(FIT_SCRIPT, str(tmp_path / "two"))
    launch(FIT_SCRIPT, str(tmp_path / "one"), world=1)
    single = torch.load(tmp_path / "one" / "rank0-of1.pt")
    for rank in (0, 1):
        got = torch.load(tmp_path / "two" / f"rank{rank}-of2.pt")
        # anomalib #2673: each rank kept only its own part. The ranks embed other batches than one process:
        # the features, and so the bank, agree to float tolerance
        torch.testing.assert_close(got["bank"], single["bank"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got["patchcore:coreset=0.2,partition=50"], single["patchcore:coreset=0.2,partition=50"])
        torch.testing.assert_close(got["padim:features=20"], single["padim:features=20"], atol=1e-4, rtol=1e-4)


FEATURE_EBM_SCRIPT = """
import sys, torch
from pathlib import Path
from adkit.core import distributed
from adkit.core.components import DetectorContext
from adkit.core.plugins import get_catalog
from adkit.run.engine import TrainSettings, train_detector
device = distributed.init_from_environment(torch.device("cpu"))
catalog = get_catalog()
images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
detector = catalog["detector"].create("feature-ebm-patch:buffer_size=64,steps_batch=16")
detector.setup(DetectorContext(build=catalog.builder(), image_size=64, device=device))
train_detector(detector, images, TrainSettings(steps=3, batch_size=2), device, Path(sys.argv[1]) / "checkpoint.pt",
               meta={})
with torch.inference_mode():
    torch.save(detector.detect(images[:2]).anomaly_map, Path(sys.argv[1]) / f"rank{distributed.rank()}.pt")
"""


def test_feature_energy_models_train_under_torchrun_and_every_rank_ends_with_one_model(tmp_path):
    """Each rank extracts the features and fits the same Gaussian; the tilt trains under DistributedDataParallel
    and the ranks end with rank 0's state (chains included), so their maps agree."""
    launch(FEATURE_EBM_SCRIPT, str(tmp_path))
    torch.testing.assert_close(torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt"))
    assert (tmp_path / "checkpoint.pt").exists()


PLAN_SCRIPT = """
import torch.distributed as dist
from adkit.app.workflows import joined
from adkit.run.config import RunConfig
from adkit.run.planning import plan
plan(RunConfig(detector=["pixel-gauss"], data="synthetic:size=32,n_train=8,n_test=6", category=["wood"]))
print("after plan", dist.is_initialized())
joined(lambda config: None)(RunConfig(device="cpu"))
print("after a workflow's entry", dist.is_initialized(), dist.get_world_size())
"""


def test_planning_joins_no_process_group_and_a_workflow_entry_does():
    """plan() only computes; the process group is joined in one place, the entry every workflow goes through."""
    for output in launch(PLAN_SCRIPT):
        assert "after plan False" in output and "after a workflow's entry True 2" in output


LEAVE_OUT_SCRIPT = """
import sys
from adkit import api
from adkit.run.config import RunConfig
api.run(RunConfig(detector=["patchcore:coreset=0.2"], data="synthetic:size=32,n_train=16,n_test=4,val_fraction=0.25",
                  category=["wood"], image_size=32, out=sys.argv[1]))
"""


def test_left_out_scores_under_torchrun_are_the_single_process_ones(tmp_path):
    """Each rank scores its share of the training images left out of the fit, each as the training row it is; rank 0
    gets them all back in order: the scores a single process gives, to float tolerance."""
    launch(LEAVE_OUT_SCRIPT, str(tmp_path / "two"))
    launch(LEAVE_OUT_SCRIPT, str(tmp_path / "one"), world=1)
    two, one = (json.loads((tmp_path / name / "wood" / "validation.json").read_text()) for name in ("two", "one"))
    assert two["fit"]["left_out"].split(":")[0] == one["fit"]["left_out"].split(":")[0]
    if "left_out_scores" in one:  # pooled in both (the check decides alike on the same scores)
        np.testing.assert_allclose(two["left_out_scores"], one["left_out_scores"], rtol=1e-4)
