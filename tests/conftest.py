from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from adkit.core.plugins import get_catalog, reset_catalog


@pytest.fixture(autouse=True, scope="session")
def _cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("ADKIT_CACHE", str(tmp_path_factory.mktemp("adkit-cache")))
    # categories one after the other: a test's monkeypatches do not reach worker processes (tests/test_workers.py
    # runs categories side by side on purpose)
    mp.setenv("ADKIT_WORKERS", "1")
    # float32 backbones whatever the CPU: figures compared across machines must not depend on its bf16 instructions
    # (tests/test_precision.py turns the check on where it tests it)
    mp.setenv("ADKIT_CPU_BF16", "0")
    mp.delenv("ADKIT_LOAD_PLUGINS", raising=False)
    mp.delenv("ADKIT_DISABLE_PLUGINS", raising=False)
    yield
    mp.undo()


@pytest.fixture
def catalog():
    reset_catalog()
    yield get_catalog()
    reset_catalog()


@pytest.fixture
def invoke():
    """Run the real console entry point in-process; returns (exit code, stdout, stderr)."""
    from adkit.testing import invoke as run

    reset_catalog()
    return run


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def mvtec_tree(tmp_path):
    """A tiny MVTec-layout category 'widget': 6 normal train, 2 good test, 2 'scratch' test with masks."""
    rng = np.random.default_rng(0)
    root = tmp_path / "mvtec"
    base = root / "widget"
    for i in range(6):
        write_png(base / "train" / "good" / f"{i:03d}.png", rng.integers(100, 140, (20, 24, 3), dtype=np.uint8))
    for i in range(2):
        write_png(base / "test" / "good" / f"{i:03d}.png", rng.integers(100, 140, (20, 24, 3), dtype=np.uint8))
        img = rng.integers(100, 140, (20, 24, 3), dtype=np.uint8)
        img[5:10, 5:10] = 255
        write_png(base / "test" / "scratch" / f"{i:03d}.png", img)
        mask = np.zeros((20, 24), dtype=np.uint8)
        mask[5:10, 5:10] = 255
        write_png(base / "ground_truth" / "scratch" / f"{i:03d}_mask.png", mask)
    return root
