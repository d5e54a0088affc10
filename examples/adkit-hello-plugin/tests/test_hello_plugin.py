"""The example plugin's own tests, as a plugin author would write them: the adkit.testing contract check of each
component (built through adkit's catalog, so the entry point is tested too), values checked against numpy, and the
command through adkit's console entry point."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adkit.plugin import (
    TrainSettings,
    check_detector,
    check_postprocessor,
    check_scorer,
    invoke,
    load_catalog,
    load_checkpoint,
    restore,
    train_detector,
)


@pytest.fixture(scope="module")
def catalog():
    catalog = load_catalog()
    assert catalog.plugins["hello"].status == "ok"
    return catalog


@pytest.mark.parametrize("check,spec", [(check_detector, "pixel-gauss"), (check_postprocessor, "clip"),
                                        (check_scorer, "p99")])
def test_components_keep_their_contracts(check, spec):
    check(spec)


def test_pixel_gauss_map_is_the_largest_absolute_z_score(catalog, tmp_path):
    generator = torch.Generator().manual_seed(0)
    train, test = torch.rand(5, 3, 4, 4, generator=generator), torch.rand(2, 3, 4, 4, generator=generator)
    detector = catalog["detector"].create("pixel-gauss:min_std=0.001")
    train_detector(detector, train, TrainSettings(steps=1, batch_size=2), torch.device("cpu"),
                   tmp_path / "checkpoint.pt", meta={})
    x = train.double().numpy()
    z = np.abs((test.double().numpy() - x.mean(0)) / np.maximum(x.std(0), 0.001))
    with torch.inference_mode():
        got = detector.anomaly_map(test)
    np.testing.assert_allclose(got[:, 0].numpy(), z.max(1), rtol=1e-5)
    restored = catalog["detector"].create("pixel-gauss:min_std=0.001")
    restore(restored, load_checkpoint(tmp_path / "checkpoint.pt"), "checkpoint")  # fitted buffers at image shape
    with torch.inference_mode():
        assert torch.equal(restored.anomaly_map(test), got)


def test_clip_and_p99(catalog):
    maps = torch.linspace(-5, 15, 2 * 1 * 10 * 10).view(2, 1, 10, 10)
    clipped = catalog["postprocessor"].create("clip:low=0,high=10")(maps)
    assert clipped.min() == 0 and clipped.max() == 10
    scores = catalog["scorer"].create("p99")(maps)
    np.testing.assert_allclose(scores.numpy(), np.percentile(maps.flatten(1).numpy(), 99, axis=1), rtol=1e-6)
    with pytest.raises(Exception, match="clip needs high > low"):
        catalog["postprocessor"].create("clip:low=1,high=0")


def test_hello_command():
    code, out, err = invoke("hello")
    assert code == 0, err
    assert out == "adkit-hello-plugin: detector pixel-gauss, post-processor clip, scorer p99\n"
