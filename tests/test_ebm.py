from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adkit.core.components import DetectorContext, EnergyNetwork
from adkit.run.engine import TrainSettings, train_detector
from adkit_plugins.ebm.detectors import EBMImage, EBMPatch
from adkit_plugins.ebm.networks import WideResNetEnergy
from adkit_plugins.ebm.samplers import PYLD, SGLD, ReplayBuffer


class QuadraticWell(EnergyNetwork):
    """f(x) = -sum (conv1(x) - c)^2 with conv1 the identity: energy is lowest at x = c."""

    def __init__(self, centre: float = 0.3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, 1, bias=False)
        nn.init.ones_(self.conv1.weight)
        self.centre = centre

    def forward(self, x):
        return -((self.conv1(x) - self.centre) ** 2).flatten(1).sum(1)


@pytest.mark.parametrize("sampler", [PYLD(M=10, N=5, alpha=0.05), SGLD(K=40, step=0.05, noise=0.001)])
def test_samplers_move_toward_low_energy(sampler):
    well = QuadraticWell()
    x0 = torch.rand(4, 1, 5, 5, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = sampler.sample(well, x0, torch.Generator().manual_seed(1))
    assert (-well(x)).mean() < 0.2 * (-well(x0)).mean()
    assert (x - 0.3).abs().max() < (x0 - 0.3).abs().max()


def test_pyld_inner_loop_equals_direct_clipped_steps():
    torch.manual_seed(0)
    conv1 = nn.Conv2d(3, 4, 3, padding=1)
    sampler = PYLD(M=1, N=4, alpha=0.2, eps=0.05)
    x = torch.rand(2, 3, 6, 6) * 2 - 1
    p = torch.randn(2, 4, 6, 6)
    got = sampler.inner_steps(conv1, x, p)
    expected = x.clone()
    for _ in range(4):  # grad of sum(conv1(x) * p) is the transposed convolution of p
        grad = F.conv_transpose2d(p, conv1.weight, padding=1)
        expected = (expected + 0.2 * grad.clamp(-0.05, 0.05)).clamp(-1, 1)
    assert torch.allclose(got, expected, atol=1e-6)
    assert sampler.first_layer_passes == 4 and sampler.full_passes == 0


def test_pyld_outer_gradients_and_projection():
    torch.manual_seed(0)
    network = WideResNetEnergy(depth=10, widen=1)
    sampler = PYLD(M=3, N=2, alpha=5.0)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    x = sampler.sample(network, x0)
    assert x.min() >= -1 and x.max() <= 1 and not x.requires_grad
    assert sampler.full_passes == 3 and sampler.first_layer_passes == 6
    assert network.first_layer() is network.input_layer() is network.conv1
    eta, p = sampler.outer_gradients(network, x0, network.conv1)
    assert eta.shape == x0.shape and p.shape == (2, 16, 8, 8)


def test_pyld_finds_first_layer_of_a_timm_backbone():
    from adkit_plugins.ebm.networks import TimmEnergy

    network = TimmEnergy("resnet10t")
    x = PYLD(M=1, N=1).sample(network, torch.rand(2, 3, 32, 32) * 2 - 1)
    assert x.shape == (2, 3, 32, 32)


def test_replay_buffer_gaussian_init_and_reinit():
    data = torch.randn(50, 3, 4, 4) * 0.1 + 0.5
    buffer = ReplayBuffer(20, (3, 4, 4), reinit=0.0)
    g = torch.Generator().manual_seed(0)
    buffer.fit(data.clamp(-1, 1), g)
    assert abs(buffer.samples.mean().item() - 0.5) < 0.05
    start, index = buffer.draw(8, g)
    assert torch.equal(start, buffer.samples[index])
    buffer.store(index, torch.zeros_like(start))
    assert buffer.samples[index].abs().sum() == 0
    assert ReplayBuffer(10, (3, 4, 4), reinit=1.0).draw(4, g)[0].abs().sum() > 0


def test_wrn_28_10_trunk_parameters():
    network = WideResNetEnergy(28, 10)
    trunk = sum(p.numel() for name, p in network.named_parameters() if not name.startswith("head"))
    assert trunk == 36_482_880  # the spec's 36.5 M


@pytest.mark.parametrize("cls,params", [
    (EBMImage, {"depth": 10, "widen": 1, "buffer_size": 16}),
    (EBMPatch, {"depth": 10, "widen": 1, "buffer_size": 16, "patch_size": 8, "crop": 0.5, "grid": 2}),
])
def test_ebm_training_step_and_map(catalog, cls, params):
    torch.manual_seed(0)
    detector = cls(**params, sampler="pyld:M=2,N=2")
    detector.setup(DetectorContext(build=catalog.builder(), image_size=16, device=torch.device("cpu")))
    images = torch.rand(6, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    detector.on_train_start(images, g)
    out = detector.training_step(images[:4], g)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and detector.network.conv1.weight.grad is not None
    maps = detector.eval().anomaly_map(images[:2])
    expected = (2, 1, 1, 1) if cls is EBMImage else (2, 1, 2, 2)
    assert maps.shape == expected


def test_energy_penalty_adds_squared_energies(catalog):
    images = torch.rand(6, 3, 16, 16)
    outs = []
    for penalty in (0.0, 0.5):
        torch.manual_seed(0)  # the same network and, below, the same data noise, chains and sampler draws
        detector = EBMImage(depth=10, widen=1, buffer_size=16, sampler="pyld:M=2,N=2", energy_penalty=penalty)
        detector.setup(DetectorContext(build=catalog.builder(), image_size=16, device=torch.device("cpu")))
        g = torch.Generator().manual_seed(0)
        detector.on_train_start(images, g)
        outs.append(detector.training_step(images[:4], g))
    plain, penalised = outs
    # with batch-mean f's: E[f^2] >= (E f)^2, so the penalty is at least 0.5 (f_data^2 + f_sample^2) of the means
    extra = penalised["loss"] - plain["loss"]
    assert torch.equal(plain["f_data"], penalised["f_data"]) and torch.equal(plain["f_sample"], penalised["f_sample"])
    assert extra >= 0.5 * (plain["f_data"] ** 2 + plain["f_sample"] ** 2) - 1e-6
    with pytest.raises(ValueError, match="energy_penalty"):
        EBMImage(depth=10, widen=1, energy_penalty=-1)


def test_patch_grid_is_row_major(catalog):
    detector = EBMPatch(depth=10, widen=1, patch_size=8, grid=2)
    images = torch.zeros(1, 3, 16, 16)
    images[..., 8:, :8] = 1.0  # bottom-left quadrant
    patches = detector.patches(images)
    assert [round(p.mean().item()) for p in patches] == [0, 0, 1, 0]


def test_low_rank_buffer_reproduces_correlated_data():
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(3 * 4 * 4, generator=g)
    direction = direction / direction.norm()
    coefficients = torch.randn(400, 1, generator=g) * 0.3
    data = (coefficients * direction).view(400, 3, 4, 4) + 0.01 * torch.randn(400, 3, 4, 4, generator=g)
    buffer = ReplayBuffer(300, (3, 4, 4), reinit=0.0, rank=1)
    buffer.fit(data, g)
    along = buffer.samples.flatten(1) @ direction
    assert 0.2 < along.std() < 0.4  # the principal direction's spread is kept
    diagonal = ReplayBuffer(300, (3, 4, 4), reinit=0.0)
    diagonal.fit(data, g)
    assert (diagonal.samples.flatten(1) @ direction).std() < 0.15  # a diagonal Gaussian loses it


def _stripes(n: int, g: torch.Generator) -> torch.Tensor:
    """Horizontal sine stripes of random phase, 16 px, with a little pixel noise."""
    phase = torch.rand(n, 1, 1, 1, generator=g) * 2 * math.pi
    columns = torch.linspace(0, 4 * math.pi, 16).view(1, 1, 1, 16)
    images = 0.5 + 0.3 * torch.sin(columns + phase).expand(n, 3, 16, 16).clone()
    images[:, 1] *= 0.5
    return (images + 0.02 * torch.randn(images.shape, generator=g)).clamp(0, 1)


def test_ebm_training_orders_energies_normal_defective_noise(catalog, tmp_path):
    # contrastive divergence pushes f up on data and down on samples: after 60 steps on stripes, held-out stripes
    # have the lowest mean energy, stripes with a foreign square more, draws of the buffer's Gaussian the most
    # (the same order with seeds 0-5; with the loss's sign flipped the stripes come last)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    detector = EBMImage(depth=10, widen=1, buffer_size=64, sampler="pyld:M=5,N=3", lr=1e-3)
    detector.setup(DetectorContext(build=catalog.builder(), image_size=16, device=torch.device("cpu")))
    train_detector(detector, _stripes(64, g), TrainSettings(steps=60, batch_size=16), torch.device("cpu"),
                   tmp_path / "checkpoint.pt", meta={})
    normal, defective = _stripes(40, g), _stripes(40, g)
    corners = torch.randint(0, 10, (40, 2), generator=g)
    for image, (row, col), colour in zip(defective, corners.tolist(), torch.rand(40, 3, 1, 1, generator=g)):
        image[:, row:row + 6, col:col + 6] = colour  # a flat square of a foreign colour
    detector.eval()
    with torch.no_grad():
        e_normal, e_defective = detector.anomaly_map(normal).mean(), detector.anomaly_map(defective).mean()
        e_noise = detector.energy(detector.buffer.fresh(40, g)).mean()
    assert e_normal < e_defective < e_noise


def test_pretrained_trunk_input_layer_is_the_map_to_the_first_convolution(catalog):
    from adkit.core.components import DetectorContext

    detector = catalog["detector"].create("ebm-image:backbone=efficientnet-lite0,trunk_layer=2")
    detector.setup(DetectorContext(build=catalog.builder(), image_size=32, device=torch.device("cpu")))
    network = detector.network
    conv1 = network.first_layer()
    trunk_convs = [m for m in network.trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    assert conv1 is trunk_convs[0]  # the trunk's stem: the first layer the forward runs
    captured = []
    handle = conv1.register_forward_hook(lambda module, inputs, output: captured.append(output))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    f = network(x)
    handle.remove()
    assert f.shape == (2,)
    # PYLD's inner steps climb sum(z1 * p) through this map: it must give the z1 the full forward computes
    torch.testing.assert_close(network.input_layer()(x), captured[0])
    with pytest.raises(TypeError, match="pyld samples an adkit.core.components.EnergyNetwork"):
        PYLD(M=1, N=1).sample(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1)), torch.zeros(2, 3, 2, 2))


@pytest.mark.parametrize("trunk", ["frozen", "finetune"])
def test_ebm_on_a_pretrained_trunk_trains_its_head_and_checkpoints_what_trained(catalog, tmp_path, trunk):
    from adkit.core.components import DetectorContext
    from adkit.run.engine import TrainSettings, load_checkpoint, train_detector

    detector = catalog["detector"].create(f"ebm-image:backbone=efficientnet-lite0,trunk={trunk},buffer_size=8")
    detector.setup(DetectorContext(build=catalog.builder(), image_size=32, device=torch.device("cpu"), sampler="pyld:M=1,N=2"))
    stem_before = detector.network.trunk.model.conv_stem.weight.detach().clone()
    head_before = detector.network.head[0].weight.detach().clone()
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    train_detector(detector, images, TrainSettings(steps=3, batch_size=2), torch.device("cpu"),
                   tmp_path / "checkpoint.pt", meta={})
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    trunk_keys = [k for k in payload["model"] if k.startswith("network.trunk.")]
    assert not torch.equal(detector.network.head[0].weight, head_before)
    if trunk == "frozen":
        assert torch.equal(detector.network.trunk.model.conv_stem.weight, stem_before)
        assert not trunk_keys and payload["backbones"]["network.trunk"]["spec"] == "efficientnet-lite0"
    else:
        assert not torch.equal(detector.network.trunk.model.conv_stem.weight, stem_before)
        assert trunk_keys and not payload["backbones"]  # fine-tuned weights are stored like any other
