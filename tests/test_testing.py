"""adkit.testing: every built-in component passes the contract check of its kind, and a component that breaks a
contract fails it with a message naming the contract."""

from __future__ import annotations

import pytest
import torch

from adkit import hookimpl, testing
from adkit.core.components import Detector, Loss, Sampler, Scorer
from adkit.core.plugins import Catalog

BUILT_IN = [
    (testing.check_detector, "draem:recon_width=4,disc_width=4"),
    (testing.check_detector, "patchcore"),
    (testing.check_detector, "padim"),
    (testing.check_detector, "ebm-image:depth=10,widen=1,buffer_size=8"),
    (testing.check_detector, "ebm-patch:depth=10,widen=1,buffer_size=8,patch_size=8,grid=2"),
    (testing.check_detector, "pixel-gauss"),
    (testing.check_detector, "feature-ebm-patch:buffer_size=64,steps_batch=16"),
    (testing.check_detector, "feature-ebm-image:buffer_size=64,steps_batch=16"),
    *[(testing.check_postprocessor, s) for s in ("freqmask", "avgpool:kernel=3", "gaussian", "unsharp", "crop",
                                                 "clip")],
    *[(testing.check_scorer, s) for s in ("max", "maxmin", "topk-mean", "mean", "p99")],
    *[(testing.check_loss, s) for s in ("l2", "ssim", "color", "psnr")],
    (testing.check_sampler, "pyld:M=2,N=2"),
    (testing.check_sampler, "sgld:K=3"),
    (testing.check_backbone, "efficientnet-lite0"),
    *[(testing.check_ensemble, s) for s in ("mean", "max", "rank")],
    (testing.check_dataset, testing.TINY_DATA),
    (testing.check_exporter, "onnx"),
    (testing.check_exporter, "torchscript"),
]


@pytest.mark.parametrize("check,spec", BUILT_IN, ids=[spec for _, spec in BUILT_IN])
def test_built_in_components_keep_their_contracts(catalog, check, spec):
    check(spec, catalog)


class BatchStatistics(Detector):
    """Normalises each batch by its own mean: an image's map depends on its neighbours."""

    trainable = False

    def fit(self, batches):
        for _ in batches:
            pass

    def anomaly_map(self, images):
        return (images - images.mean(0, keepdim=True)).abs().mean(1, keepdim=True)


class HiddenState(Detector):
    """Keeps what it fitted in a plain attribute, which no checkpoint holds."""

    trainable = False

    def __init__(self):
        super().__init__()
        self.mean = None

    def fit(self, batches):
        self.mean = torch.cat(list(batches)).mean(0)

    def anomaly_map(self, images):
        return (images - self.mean).abs().mean(1, keepdim=True)


class KeepsTheMapDimension(Scorer):
    def forward(self, anomaly_map):
        return anomaly_map.flatten(2).amax(2)  # (B, 1) instead of (B,)


class HalfPrecisionLoss(Loss):
    def forward(self, prediction, target):
        return ((prediction - target) ** 2).mean()


class IgnoresTheGenerator(Sampler):
    def sample(self, network, x0, generator=None):
        self.full_passes += 1
        return (x0 + torch.randn_like(x0)).detach()


class Broken:
    @hookimpl
    def register_detectors(self, register):
        register("batch-stats", BatchStatistics)
        register("hidden-state", HiddenState)

    @hookimpl
    def register_scorers(self, register):
        register("keepdim", KeepsTheMapDimension)

    @hookimpl
    def register_losses(self, register):
        register("half", HalfPrecisionLoss)

    @hookimpl
    def register_samplers(self, register):
        register("unseeded", IgnoresTheGenerator)


@pytest.mark.parametrize("check,spec,needle", [
    (testing.check_detector, "batch-stats", "an image's map changes with the rest of its batch"),
    (testing.check_detector, "hidden-state", "restored from its checkpoint fails .* state outside the state dict"),
    (testing.check_scorer, "keepdim", r"scores must be \(B,\)=3, got torch.Size\(\[3, 1\]\)"),
    (testing.check_loss, "half", r"under bf16 autocast it returns torch.bfloat16; decorate forward"),
    (testing.check_sampler, "unseeded", "the same generator seed must give the same samples"),
])
def test_a_component_breaking_its_contract_fails_its_check(check, spec, needle):
    catalog = Catalog()
    assert catalog.add_plugin(Broken(), name="broken").status == "ok"
    with pytest.raises(testing.ContractError, match=needle):
        check(spec, catalog)


def test_invoke_runs_the_console_entry_point():
    code, out, err = testing.invoke("run", "--detector", "nonexistent")
    assert code == 2 and out == "" and "unknown detector 'nonexistent'" in err
    code, out, _ = testing.invoke("plugins")
    assert code == 0 and "draem" in out


def test_tiny_data_is_deterministic(tmp_path):
    assert torch.equal(testing.tiny_images(2), testing.tiny_images(2))
    images, masks = testing.tiny_defects(2)
    assert images.shape == (2, 3, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0} and masks.sum() > 0
    root = testing.tiny_dataset(tmp_path / "data")
    assert len(list((root / "wood" / "train" / "good").glob("*.png"))) == 8
