"""Energy models over frozen pretrained features (``feature-ebm-patch``, ``feature-ebm-image``): the seed's patch-
and image-level energy models with PYLD-M-N, in the feature space of a registered backbone instead of pixel space,
where short-run Langevin chains move and mix on a CPU (docs/methods/ebm.md gives the reading and the figures).

The energy is a Gaussian base measure tilted by a learned network (an exponentially tilted Gaussian):

    E(x) = |z|^2 / 2 - g(x),   z = W (f - mean),   x = z / spread  (and, for patches, the grid position),

- f a feature vector (a locally aware patch feature, or a whole image's pooled stages); ``mean`` and the
  whitening W come from a Gaussian fitted to the training features with Ledoit-Wolf shrinkage (per grid position
  for patches: parts are not stationary), so |z|^2 / 2 alone is the Gaussian's energy;
- g(x) = tilt * tanh(h(x) / tilt), h an MLP whose first layer is the one PYLD's inner steps run through (z1).
  The bound ``tilt`` keeps what the network learns a reshaping of the density near the training data: far from
  it (a defect) the quadratic dominates whatever h does there, where it saw no data. tilt = 0 gives the base alone;
- contrastive divergence trains h only: L = mean E(x_data + noise) - mean E(x_sample) + penalty * (g_data^2 +
  g_sample^2), the samples drawn by the sampler (PYLD-M-N by default, SGLD the alternative) from a replay buffer
  initialised from the fitted Gaussian (informative initialisation: N(0, I / spread^2) in x), 5 % re-initialised
  per draw. ``fit`` work happens once in ``on_train_start`` (feature extraction, the Gaussian); every training
  step then works on feature vectors alone, no backbone pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adkit.plugin import (
    AdkitError,
    Backbone,
    Detector,
    DetectorContext,
    EnergyNetwork,
    Moments,
    build_backbone,
    check_layers,
    ledoit_wolf_from,
    locally_aware_patches,
    merge,
    moments,
    whitening,
)
from adkit_plugins.ebm.samplers import ReplayBuffer

# Langevin in x = z / spread: the base's gradient is spread^2 x (16 x at spread 4). A step of N * alpha = 0.0075
# per outer step with noise sqrt(2 * N * alpha) leaves the base's law N(0, I / spread^2) stationary up to a
# discretisation error of 6 % in variance (1 / (1 - 16 * 0.0075 / 2)); larger steps mix faster but sample a wider
# law than the model's, which contrastive divergence then learns to push away (measured: +32 % at 0.03)
DEFAULT_SAMPLER = "pyld:M=5,N=3,alpha=0.0025,eps=100.0,sigma=0.122"
GAUSSIAN_CHUNK = 128  # Gaussians whose float64 moments are computed at once


class TiltLayer(nn.Linear):
    """z1 = [W x + b, x]: a Linear layer whose last ``in_features`` outputs pass the input through (identity rows,
    not trained). The base term then reads x from z1, so PYLD's inner steps, which run through the first layer
    only, follow the whole energy's gradient and not just the network's."""

    def __init__(self, in_features: int, width: int):
        super().__init__(in_features, width)
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([F.linear(x, self.weight, self.bias), x], -1)


class TiltedGaussian(EnergyNetwork):
    """f(x) = -E(x) for vectors x (N, D): g(x) - spread^2 |x[:, :features]|^2 / 2 (module docstring). ``parts``
    also returns g, which the energy penalty keeps small."""

    def __init__(self, dim: int, features: int, width: int, depth: int, spread: float, tilt: float):
        super().__init__()
        self.first = TiltLayer(dim, width)
        layers: list[nn.Module] = [nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.SiLU()]
        layers.append(nn.Linear(width, 1))
        self.rest = nn.Sequential(*layers)
        self.width, self.features, self.base_weight, self.tilt = width, features, spread**2, tilt

    def first_layer(self) -> nn.Module:
        return self.first

    def forward(self, x: Tensor) -> Tensor:
        return self.parts(x)[0]

    def parts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z1 = self.first(x)
        inputs = z1[..., self.width:self.width + self.features]
        base = 0.5 * self.base_weight * inputs.pow(2).sum(-1)
        if self.tilt == 0:
            learned = base.new_zeros(()) * z1[..., 0]  # keeps the graph (and PYLD's hook) alive
        else:
            learned = self.tilt * torch.tanh(self.rest(z1[..., :self.width]).squeeze(-1) / self.tilt)
        return learned - base, learned


class FeatureEBM(Detector):
    """What the two feature-space energy models share: the fitted Gaussian, the tilted energy, contrastive
    divergence on stored feature vectors. Subclasses say what a vector is and how many Gaussians there are."""

    default_scorer = "max"
    consumes: ClassVar[frozenset[str]] = frozenset({"sampler", "backbone"})
    fitted_buffers: ClassVar[tuple[str, ...]] = ("feature_mean", "whitening", "base_scatter", "base_cube",
                                                 "base_quartic")
    name = "feature-ebm"
    # new images update the Gaussian base (its moments merge exactly; Ledoit-Wolf and the whitening are
    # recomputed); the tilt network stays as trained
    updatable = True

    def __init__(self, backbone: str, layers: tuple[int, ...], width: int, depth: int, steps_batch: int, lr: float,
                 data_noise: float, buffer_size: int, reinit: float, sampler: str, spread: float, tilt: float,
                 penalty: float):
        super().__init__()
        self.layers = check_layers(layers, self.name)
        if min(width, depth, steps_batch, buffer_size) < 1 or lr <= 0 or data_noise < 0 or not 0 <= reinit <= 1 \
                or spread <= 0 or tilt < 0 or penalty < 0:
            raise ValueError(f"{self.name} needs width, depth, steps_batch, buffer_size >= 1, lr > 0, spread > 0, "
                             "data_noise, tilt, penalty >= 0 and reinit in [0, 1]")
        self.backbone_spec, self.width, self.depth = backbone, width, depth
        self.steps_batch, self.lr, self.data_noise = steps_batch, lr, data_noise
        self.buffer_size, self.reinit, self.sampler_spec = buffer_size, reinit, sampler
        self.spread, self.tilt, self.penalty = spread, tilt, penalty
        self.backbone: Backbone | None = None
        self.sampler = None
        self.network: TiltedGaussian | None = None
        self.buffer: ReplayBuffer | None = None
        # z = whitening @ (f - feature_mean): (G, d) and (G, d, d), G Gaussians (grid positions, or one)
        self.register_buffer("feature_mean", torch.zeros(0, 0))
        self.register_buffer("whitening", torch.zeros(0, 0, 0))
        # the base's moments (adkit.stats.moments), for updates: count, scatter (G, d, d), cube (G, d), quartic (G,)
        self.register_buffer("base_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("base_scatter", torch.zeros(0, 0, 0))
        self.register_buffer("base_cube", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("base_quartic", torch.zeros(0, dtype=torch.float64))
        self.train_vectors: Tensor | None = None  # the training set's inputs, made once by on_train_start

    # -- what a vector is (subclasses) -------------------------------------------------------------------------

    def feature_dim(self) -> int:
        raise NotImplementedError

    def extra_dims(self) -> int:
        """Inputs after the whitened feature (the patch model's grid position)."""
        return 0

    def features(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> (B, G, d): G vectors per image, one per Gaussian."""
        raise NotImplementedError

    def vectors(self, features: Tensor) -> Tensor:
        """(B, G, d) features -> (B, G, D) network inputs: whitened, divided by spread, extras appended."""
        z = torch.einsum("gij,bgj->bgi", self.whitening, features.float() - self.feature_mean)
        return z / self.spread

    # -- set-up and training -----------------------------------------------------------------------------------

    def setup(self, context: DetectorContext) -> None:
        self.backbone = build_backbone(context, self.backbone_spec)
        try:
            self.backbone.check_stages(self.layers, self.name)
        except (ValueError, AdkitError) as exc:
            raise AdkitError(f"{self.name}: {exc}") from None
        self.sampler = context.build("sampler", context.sampler or self.sampler_spec)
        self.build_energy(context.device)

    def build_energy(self, device: torch.device) -> None:
        """The tilted energy and the replay buffer, sized by ``feature_dim`` (known once the backbone is)."""
        dim = self.feature_dim() + self.extra_dims()
        self.network = TiltedGaussian(dim, self.feature_dim(), self.width, self.depth, self.spread, self.tilt).to(device)
        self.buffer = ReplayBuffer(self.buffer_size, (dim,), self.reinit, "gaussian").to(device)

    def on_train_start(self, images: Tensor, generator: torch.Generator) -> None:
        """Extract the training features once, fit the Gaussian(s), fill the replay buffer from the fitted law."""
        if images.shape[0] < 2:
            raise AdkitError(f"{self.name}: {images.shape[0]} training image(s); the feature Gaussian that the energy "
                             "and the replay buffer start from needs at least 2: give more training images")
        device = self.whitening.device
        with torch.inference_mode():
            raw = torch.cat([self.features(images[i:i + 16].to(device)).float().cpu()
                             for i in range(0, len(images), 16)])  # (N, G, d)
        self._keep_base(self._moments(raw))
        with torch.inference_mode():
            vectors = self.vectors(raw.to(device))
        self.train_vectors = vectors.reshape(-1, vectors.shape[-1]).clone()
        if not bool(self.buffer.filled):  # a resumed run keeps its chains
            self.buffer.fit(self.train_vectors.clamp(-1, 1), generator)
            features = self.feature_dim()  # the fitted law in x: N(0, I / spread^2) for the whitened part
            self.buffer.mean[:features] = 0
            self.buffer.std[:features] = 1 / self.spread
            self.buffer.samples.copy_(self.buffer.fresh(self.buffer.size, generator))

    @staticmethod
    def _moments(raw: Tensor) -> list[Moments]:
        """The moments of features (N, G, d), per chunk of Gaussians (bounded float64 memory)."""
        return [moments(raw[:, g:g + GAUSSIAN_CHUNK].transpose(0, 1), fourth=True)
                for g in range(0, raw.shape[1], GAUSSIAN_CHUNK)]

    def _keep_base(self, chunks: list[Moments]) -> None:
        """Store the base's moments and its Ledoit-Wolf mean and whitening, computed from what is stored."""
        device = self.whitening.device
        self.base_count = torch.tensor(chunks[0].count, device=device)
        self.base_scatter = torch.cat([c.scatter for c in chunks]).float().to(device)
        self.base_cube = torch.cat([c.cube for c in chunks]).to(device)
        self.base_quartic = torch.cat([c.quartic for c in chunks]).to(device)
        self.feature_mean = torch.cat([c.mean for c in chunks]).float().to(device)
        self.whitening = torch.cat([whitening(ledoit_wolf_from(stats)[1]).float()
                                    for stats in self._stored_moments()]).to(device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "base_count" not in state_dict:  # trained before updates (adkit < 0.4): it scores, not updates
            state_dict[prefix + "base_count"] = torch.zeros((), dtype=torch.long)
            state_dict[prefix + "base_scatter"] = torch.zeros(0, 0, 0)
            state_dict[prefix + "base_cube"] = torch.zeros(0, 0, dtype=torch.float64)
            state_dict[prefix + "base_quartic"] = torch.zeros(0, dtype=torch.float64)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _stored_moments(self) -> list[Moments]:
        g = self.feature_mean.shape[0]
        return [Moments(int(self.base_count), self.feature_mean[i:i + GAUSSIAN_CHUNK].double(),
                        self.base_scatter[i:i + GAUSSIAN_CHUNK].double(), self.base_cube[i:i + GAUSSIAN_CHUNK],
                        self.base_quartic[i:i + GAUSSIAN_CHUNK]) for i in range(0, g, GAUSSIAN_CHUNK)]

    def update(self, batches: Iterable[Tensor]) -> None:
        """Add normal images to the Gaussian base: their moments merged with the fitted ones, the Ledoit-Wolf
        Gaussian and its whitening recomputed (with ``tilt=0`` the same detector a fit on all images gives; the
        tilt network stays as it was trained)."""
        if int(self.base_count) == 0:
            raise AdkitError(f"{self.name}: this checkpoint holds no moments to add images to (trained before adkit "
                             "0.4): train it again on all the images with adkit train")
        raw = [self.features(images).float().cpu() for images in batches]
        if not raw:
            return
        features = torch.cat(raw)
        if features.shape[1:] != self.feature_mean.shape:
            raise AdkitError(f"{self.name} was fitted on {self.feature_mean.shape[0]} grid positions; these images "
                             f"give {features.shape[1]}: use the image size it was trained with")
        self._keep_base([merge(old, new) for old, new in zip(self._stored_moments(), self._moments(features))])

    def training_step(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """One contrastive-divergence step on training vectors drawn from those extracted once (the image batch
        the engine passes is not used)."""
        if self.train_vectors is None:
            raise RuntimeError(f"{self.name}: on_train_start() must run before training_step()")
        pick = torch.randint(0, self.train_vectors.shape[0], (self.steps_batch,), generator=generator,
                             device=generator.device).to(self.train_vectors.device)
        x_data = self.train_vectors[pick]
        if self.data_noise > 0:
            x_data = x_data + self.data_noise * torch.randn(x_data.shape, generator=generator, device=x_data.device)
        start, index = self.buffer.draw(self.steps_batch, generator)
        x_sample = self.sampler.sample(self.network, start, generator)
        self.buffer.store(index, x_sample)
        (f_data, g_data), (f_sample, g_sample) = self.network.parts(x_data), self.network.parts(x_sample)
        loss = f_sample.mean() - f_data.mean() + self.penalty * (g_data.pow(2).mean() + g_sample.pow(2).mean())
        return {"loss": loss, "e_data": -f_data.mean().detach(), "e_sample": -f_sample.mean().detach(),
                "chain_move": (x_sample - start).abs().mean().detach()}

    def configure_optimizer(self, total_steps: int) -> tuple[torch.optim.Optimizer, None]:
        return torch.optim.Adam(self.network.parameters(), lr=self.lr), None

    def energies(self, features: Tensor) -> Tensor:
        """(B, G, d) features -> (B, G) energies."""
        if self.whitening.shape[0] == 0:
            raise RuntimeError(f"{self.name}: train (on_train_start) before scoring")
        if features.shape[1] != self.whitening.shape[0]:
            raise AdkitError(f"{self.name} was fitted on {self.whitening.shape[0]} grid positions; these images give "
                             f"{features.shape[1]}: use the image size it was trained with")
        vectors = self.vectors(features)
        return -self.network(vectors.reshape(-1, vectors.shape[-1])).view(vectors.shape[:2])


class FeatureEBMPatch(FeatureEBM):
    """Patch level: one Gaussian per grid position over locally aware patch features (as PatchCore embeds them),
    the tilt network sees the whitened feature and the position; the energy map is the anomaly map, upsampled and
    smoothed as PatchCore's."""

    name = "feature-ebm-patch"
    fitted_buffers: ClassVar[tuple[str, ...]] = (*FeatureEBM.fitted_buffers, "positions")
    default_postprocessors = ("gaussian:sigma=4",)
    default_pixel_map = "post"

    def __init__(self, backbone: str = "efficientnet-lite0", layers: tuple[int, ...] = (2, 3), dim: int = 64,
                 width: int = 128, depth: int = 2, steps_batch: int = 256, lr: float = 1e-2, data_noise: float = 0.01,
                 buffer_size: int = 10000, reinit: float = 0.05, sampler: str = DEFAULT_SAMPLER, spread: float = 4.0,
                 tilt: float = 4.0, penalty: float = 0.01):
        if dim < len(layers):
            raise ValueError(f"feature-ebm-patch dim must be at least one per layer ({len(layers)}), got {dim}")
        self.dim = dim
        super().__init__(backbone, layers, width, depth, steps_batch, lr, data_noise, buffer_size, reinit, sampler,
                         spread, tilt, penalty)
        self.register_buffer("positions", torch.zeros(0, 2))  # (h * w, 2) grid coordinates in [-1, 1]

    def feature_dim(self) -> int:
        return self.dim

    def extra_dims(self) -> int:
        return 2

    def features(self, images: Tensor) -> Tensor:
        patches = locally_aware_patches(self.backbone, images, self.layers, self.dim)
        return patches.flatten(2).transpose(1, 2)  # (B, h * w, d), row-major positions

    def on_train_start(self, images: Tensor, generator: torch.Generator) -> None:
        probe = images[:1].to(self.whitening.device)
        with torch.inference_mode():
            h, w = locally_aware_patches(self.backbone, probe, self.layers, self.dim).shape[-2:]
        ys = torch.linspace(-1, 1, h) if h > 1 else torch.zeros(1)
        xs = torch.linspace(-1, 1, w) if w > 1 else torch.zeros(1)
        self.positions = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(h * w, 2).to(probe.device)
        super().on_train_start(images, generator)

    def vectors(self, features: Tensor) -> Tensor:
        scaled = super().vectors(features)
        return torch.cat([scaled, self.positions.expand(features.shape[0], -1, -1).to(scaled.dtype)], -1)

    def anomaly_map(self, images: Tensor) -> Tensor:
        patches = locally_aware_patches(self.backbone, images, self.layers, self.dim)
        b, _, h, w = patches.shape
        energies = self.energies(patches.flatten(2).transpose(1, 2)).view(b, 1, h, w)
        return F.interpolate(energies, size=images.shape[-2:], mode="bilinear", align_corners=False)


class FeatureEBMImage(FeatureEBM):
    """Image level: one Gaussian over a whole-image feature (each stage's global mean and standard deviation over
    positions, concatenated); one energy per image."""

    name = "feature-ebm-image"
    image_level = True
    default_postprocessors = ()

    def __init__(self, backbone: str = "efficientnet-lite0", layers: tuple[int, ...] = (2, 3, 4), width: int = 128,
                 depth: int = 2, steps_batch: int = 128, lr: float = 1e-2, data_noise: float = 0.01,
                 buffer_size: int = 2000, reinit: float = 0.05, sampler: str = DEFAULT_SAMPLER, spread: float = 4.0,
                 tilt: float = 4.0, penalty: float = 0.01):
        super().__init__(backbone, layers, width, depth, steps_batch, lr, data_noise, buffer_size, reinit, sampler,
                         spread, tilt, penalty)

    def feature_dim(self) -> int:
        return 2 * sum(self.backbone.channels[i] for i in self.layers)

    def features(self, images: Tensor) -> Tensor:
        stages = self.backbone(images, self.layers)
        pooled = [torch.cat([f.float().mean((2, 3)), f.float().std((2, 3), correction=0)], 1) for f in stages]
        return torch.cat(pooled, 1).unsqueeze(1)

    def anomaly_map(self, images: Tensor) -> Tensor:
        return self.energies(self.features(images)).view(-1, 1, 1, 1)
