"""Threads that share the machine (adkit.core.threads): each registered adkit process takes its share of the cores."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from adkit.core import threads
from adkit.core.errors import AdkitError


def test_cores_are_divided_among_processes():
    assert threads.share(2, 1) == 2 and threads.share(2, 3) == 1 and threads.share(16, 3) == 5


def test_dead_processes_do_not_count_and_are_cleaned_up(tmp_path):
    folder = tmp_path / "running"
    folder.mkdir()
    (folder / f"{os.getpid()}.pid").touch()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / f"{dead.pid}.pid").touch()
    assert threads.live_processes(folder) == 1
    assert not (folder / f"{dead.pid}.pid").exists()


def test_a_second_process_halves_the_threads_and_its_end_gives_them_back(monkeypatch):
    saved = torch.get_num_threads()
    monkeypatch.delenv(threads.ENV, raising=False)
    try:
        threads.register()
        alone = threads.rebalance(force=True)
        assert alone == threads.share(threads.cores_available(), threads.live_processes())
        folder = threads.registry_folder()
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        (folder / f"{other.pid}.pid").touch()  # as adkit registers a process
        try:
            together = threads.rebalance(force=True)
            assert together == threads.share(threads.cores_available(), threads.live_processes())
            assert torch.get_num_threads() == together <= max(1, alone // 2 + alone % 2)
        finally:
            other.kill()
            other.wait()
        time.sleep(0.1)
        assert threads.rebalance(force=True) == alone
        monkeypatch.setenv(threads.ENV, "1")
        assert threads.rebalance(force=True) == 1 == torch.get_num_threads()
        monkeypatch.setenv(threads.ENV, "many")
        with pytest.raises(AdkitError, match="ADKIT_THREADS=many: give a positive number"):
            threads.rebalance(force=True)
    finally:
        torch.set_num_threads(saved)


def test_threads_option(invoke, tmp_path):
    code, _, err = invoke("--threads", "0", "synth", "--out", str(tmp_path / "s"))
    assert code == 2 and "--threads" in err
