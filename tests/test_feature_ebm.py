"""The feature-space energy models (feature-ebm-patch, feature-ebm-image): the Gaussian they start from against
scikit-learn, the sampler on a known quadratic energy, PYLD's first-layer step against autograd through the whole
network, what contrastive divergence learns on vectors whose law is known, a planted patch found by the patch
model, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from adkit.core.components import DetectorContext
from adkit.core.errors import AdkitError
from adkit.run.engine import TrainSettings, train_detector
from adkit.stats.covariance import ledoit_wolf, whitening
from adkit.testing import tiny_images
from adkit_plugins.ebm.features import DEFAULT_SAMPLER, FeatureEBMImage, TiltedGaussian
from adkit_plugins.ebm.samplers import PYLD, SGLD

CPU = torch.device("cpu")


class VectorEBM(FeatureEBMImage):
    """The image-level model on given vectors: "images" (N, d, 1, 1) are the features (no backbone)."""

    name = "vector-ebm"

    def __init__(self, dim: int, **params):
        super().__init__(**params)
        self.dim = dim

    def feature_dim(self) -> int:
        return self.dim

    def features(self, images):
        return images.flatten(1)[:, None, :]


def vector_ebm(dim: int, sampler, **params) -> VectorEBM:
    detector = VectorEBM(dim, **params)
    detector.sampler = sampler
    detector.build_energy(CPU)
    return detector


def default_pyld() -> PYLD:
    _, params = DEFAULT_SAMPLER.split(":")
    return PYLD(**{k: float(v) if "." in v else int(v) for k, v in (p.split("=") for p in params.split(","))})


def scores(detector: VectorEBM, vectors: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return detector.energies(detector.features(vectors)).squeeze(1)


def auroc(normal: torch.Tensor, anomalous: torch.Tensor) -> float:
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    return float(roc_auc_score(labels, torch.cat([normal, anomalous]).numpy()))


def test_ledoit_wolf_matches_scikit_learn_for_every_set_of_a_batch():
    generator = torch.Generator().manual_seed(0)
    samples = torch.randn(3, 20, 7, generator=generator, dtype=torch.float64) * torch.tensor([1, 2, 3, .1, 5, 1, 1.])
    mean, covariance = ledoit_wolf(samples)
    for i in range(3):
        reference = LedoitWolf().fit(samples[i].numpy())
        np.testing.assert_allclose(covariance[i].numpy(), reference.covariance_, atol=1e-12)
        np.testing.assert_allclose(mean[i].numpy(), reference.location_, atol=1e-12)
    w = whitening(covariance)  # |W (x - mean)|^2 is the squared Mahalanobis distance
    delta = samples[:, 0] - mean
    expected = torch.einsum("gi,gij,gj->g", delta, torch.linalg.inv(covariance), delta)
    torch.testing.assert_close((w @ delta.unsqueeze(-1)).squeeze(-1).pow(2).sum(-1), expected)
    assert whitening(torch.ones(4, 4, dtype=torch.float64)).isfinite().all()  # singular: floored, still whitens


@pytest.mark.parametrize("sampler", [default_pyld(), SGLD(K=15, step=0.0025, noise=0.0707)], ids=["pyld", "sgld"])
def test_sampler_chains_settle_at_the_quadratic_energy_of_the_gaussian(sampler):
    """E(x) = spread^2 |x|^2 / 2 (the base alone, tilt 0): chains started far away lose their energy and then
    sample the Gaussian N(0, I / spread^2), whose mean energy is d / 2, up to the step's discretisation (6 %)."""
    dim = 8
    network = TiltedGaussian(dim, dim, width=4, depth=1, spread=4.0, tilt=0.0)
    x = torch.full((2000, dim), 0.9)
    generator = torch.Generator().manual_seed(0)

    def energy(x: torch.Tensor) -> float:
        with torch.no_grad():
            return float((-network(x)).mean())

    start = energy(x)
    x = sampler.sample(network, x, generator)
    assert energy(x) < 0.5 * start
    for _ in range(30):
        x = sampler.sample(network, x, generator)
    assert dim / 2 * 0.9 < energy(x) < dim / 2 * 1.2


def test_pyld_first_layer_step_follows_the_whole_networks_gradient():
    """z1 = [W x + b, x] carries the base term too, so one inner step through the first layer alone moves x by
    alpha times df/dx, the autograd gradient through the full network (tilt, MLP and quadratic)."""
    torch.manual_seed(0)
    network = TiltedGaussian(6, 4, width=16, depth=2, spread=4.0, tilt=4.0)
    x = torch.randn(5, 6) * 0.1
    sampler = PYLD(M=1, N=1, alpha=1e-3, eps=1e9)
    _, p = sampler.outer_gradients(network, x, network.first)
    stepped = sampler.inner_steps(network.first, x, p)
    xg = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(network(xg).sum(), [xg])
    torch.testing.assert_close((stepped - x) / 1e-3, gradient, rtol=1e-4, atol=1e-4)
    assert gradient[:, 4:].abs().sum() > 0  # the extra (position) inputs reach the energy through the network


def test_a_model_of_one_gaussian_ranks_a_shifted_cluster_above_held_out_normals(tmp_path):
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(6, 6, generator=generator) * 0.5 + torch.eye(6)
    train = (torch.randn(300, 6, generator=generator) @ mixing).view(300, 6, 1, 1)
    held = (torch.randn(200, 6, generator=generator) @ mixing).view(200, 6, 1, 1)
    shifted = held + 4 * mixing[0].view(1, 6, 1, 1)  # four standard deviations along one latent direction
    detector = vector_ebm(6, default_pyld(), steps_batch=64, buffer_size=500)
    train_detector(detector, train, TrainSettings(steps=50, batch_size=4, seed=0), CPU, tmp_path / "c.pt", meta={})
    assert auroc(scores(detector, held), scores(detector, shifted)) > 0.9


def two_modes(n: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, 4, generator=generator) * 0.3
    x[:, 0] += torch.randint(0, 2, (n,), generator=generator) * 2 - 1.0
    return x.view(n, 4, 1, 1)


@pytest.mark.parametrize("sampler", [default_pyld(), SGLD(K=5, step=0.0075, noise=0.122)], ids=["pyld", "sgld"])
def test_contrastive_divergence_learns_what_the_gaussian_cannot(tmp_path, sampler):
    """Two modes at x0 = -1 and +1: the fitted Gaussian puts its lowest energy between them, where no data are;
    the tilt trained by contrastive divergence (either sampler) must rank that gap above held-out normals."""
    generator = torch.Generator().manual_seed(0)
    train, held = two_modes(400, generator), two_modes(200, generator)
    gap = torch.randn(200, 4, generator=generator) * 0.3
    gap[:, 0] *= 0.3
    gap = gap.view(200, 4, 1, 1)
    base = vector_ebm(4, sampler, tilt=0.0)
    train_detector(base, train, TrainSettings(steps=1, batch_size=4, seed=0), CPU, tmp_path / "b.pt", meta={})
    assert auroc(scores(base, held), scores(base, gap)) < 0.5  # the Gaussian alone calls the gap normal
    tilted = vector_ebm(4, sampler, steps_batch=128, buffer_size=1000)
    train_detector(tilted, train, TrainSettings(steps=600, batch_size=4, seed=0), CPU, tmp_path / "t.pt", meta={})
    assert auroc(scores(tilted, held), scores(tilted, gap)) > 0.85


def test_patch_energies_locate_a_planted_foreign_patch(catalog, tmp_path):
    """A 16 px square of another texture pasted into a normal test image: the map peaks inside it."""
    detector = catalog["detector"].create("feature-ebm-patch")
    detector.setup(DetectorContext(build=catalog.builder(), image_size=64, device=CPU))
    train_detector(detector, tiny_images(10, 64, "tile"), TrainSettings(steps=20, batch_size=4, seed=0), CPU,
                   tmp_path / "c.pt", meta={})
    images, foreign = tiny_images(4, 64, "tile", split="test"), tiny_images(4, 64, "wood", split="test")
    corners = [(8, 8), (40, 12), (20, 36), (36, 40)]
    for image, other, (y, x) in zip(images, foreign, corners):
        image[:, y:y + 16, x:x + 16] = other[:, y:y + 16, x:x + 16]
    detector.eval()
    with torch.inference_mode():
        maps = detector.anomaly_map(images)
    assert maps.shape == (4, 1, 64, 64)
    for anomaly_map, (y, x) in zip(maps, corners):
        peak_y, peak_x = divmod(int(anomaly_map.flatten().argmax()), 64)
        assert y - 4 <= peak_y < y + 20 and x - 4 <= peak_x < x + 20, ((peak_y, peak_x), (y, x))


def test_too_few_images_and_missing_stages_fail_in_one_line(catalog, tmp_path):
    detector = catalog["detector"].create("feature-ebm-image")
    detector.setup(DetectorContext(build=catalog.builder(), image_size=32, device=CPU))
    with pytest.raises(AdkitError, match=r"feature-ebm-image: 1 training image\(s\).*at least 2") as error:
        train_detector(detector, tiny_images(1, 32), TrainSettings(steps=1, batch_size=1), CPU, tmp_path / "c.pt",
                       meta={})
    assert "\n" not in str(error.value)
    deep = catalog["detector"].create("feature-ebm-patch:layers=2+7")
    with pytest.raises(AdkitError, match="feature-ebm-patch") as error:
        deep.setup(DetectorContext(build=catalog.builder(), image_size=32, device=CPU))
    assert "\n" not in str(error.value)
