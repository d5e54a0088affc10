"""Two gloo processes on the CPU, launched as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

SCRIPT = """
import sys
from adkit import api, distributed
from adkit.config import RunConfig
out = sys.argv[1]
api.train(RunConfig(detector=["draem:recon_width=4,disc_width=4"], data="synthetic:size=32,n_train=8,n_test=6",
                    category=["wood"], image_size=32, steps=3, batch_size=2, out=out, checkpoint_every=1))
# rank 0 wrote the checkpoint; every rank reads the same final step
from adkit.engine import load_checkpoint
from pathlib import Path
print("RANK", distributed.rank(), "WORLD", distributed.world_size(), "STEP",
      load_checkpoint(Path(out) / "wood" / "checkpoint.pt")["step"])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_training(tmp_path):
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path / "ddp")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
    assert "RANK 0 WORLD 2 STEP 3" in outputs[0][0] and "RANK 1 WORLD 2 STEP 3" in outputs[1][0]
    # only rank 0 wrote files: one checkpoint, one config, one log
    assert len(list((tmp_path / "ddp").rglob("checkpoint.pt"))) == 1
    assert not list((tmp_path / "ddp").rglob("*.tmp"))
    payload = torch.load(tmp_path / "ddp" / "wood" / "checkpoint.pt", weights_only=False)
    assert payload["step"] == 3
