"""Samplers for energy networks: PYLD-M-N (JEM++, Yang & Ji, ICCV 2021) and SGLD (JEM).

Both climb f(x) = -E(x) of a network mapping inputs in [-1, 1] to (B,): images (B, C, H, W) through a first
convolution, or feature vectors (B, D) through a first linear layer (the feature-space energy models).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from adkit.plugin import EnergyNetwork, Sampler


class PYLD(Sampler):
    """PYLD-M-N: M outer steps of one full forward/backward giving df/dx and df/dz1 (z1 = first conv output),
    each followed by N cheap inner steps through the first layer only:
    x~ <- clip(x~ + alpha * clip(grad_x~ sum(conv1(x~) * p), -eps, eps), -1, 1); then x <- x~ + sigma * noise."""

    def __init__(self, M: int = 20, N: int = 10, alpha: float = 0.2, eps: float = 1.0, sigma: float = 0.0,
                 seed: int = 0):
        if M < 1 or N < 1 or alpha <= 0 or eps <= 0 or sigma < 0:
            raise ValueError("pyld needs M >= 1, N >= 1, alpha > 0, eps > 0, sigma >= 0")
        self.M, self.N, self.alpha, self.eps, self.sigma = M, N, alpha, eps, sigma
        self.generator_seed = seed
        self.full_passes = 0
        self.first_layer_passes = 0

    def outer_gradients(self, network: nn.Module, x: Tensor, conv1: nn.Conv2d) -> tuple[Tensor, Tensor]:
        """(df/dx, df/dz1) from one full forward/backward, z1 captured by a hook on the first layer."""
        captured: list[Tensor] = []
        handle = conv1.register_forward_hook(lambda module, inputs, output: captured.append(output))
        try:
            x = x.detach().requires_grad_(True)
            total = network(x).sum()
        finally:
            handle.remove()
        eta, p = torch.autograd.grad(total, [x, captured[0]])
        self.full_passes += 1
        return eta, p

    def inner_steps(self, conv1: nn.Module, x: Tensor, p: Tensor) -> Tensor:
        """N steps along the gradient of H(x~) = sum(conv1(x~) * p), through the first layer only (``conv1``: the
        map from x to z1, the network's ``input_layer()``)."""
        x_tilde = x.detach()
        for _ in range(self.N):
            x_tilde = x_tilde.requires_grad_(True)
            h = (conv1(x_tilde) * p).sum()
            (grad,) = torch.autograd.grad(h, [x_tilde])
            self.first_layer_passes += 1
            x_tilde = (x_tilde + self.alpha * grad.clamp(-self.eps, self.eps)).clamp(-1, 1).detach()
        return x_tilde

    def sample(self, network: nn.Module, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if not isinstance(network, EnergyNetwork):
            raise TypeError(f"pyld samples an adkit.core.components.EnergyNetwork, which declares the first layer "
                            f"its inner steps run through; got a {type(network).__name__}")
        conv1 = network.first_layer()
        layer = network.input_layer()
        x = x0.detach()
        generator = generator or torch.Generator(device=x.device).manual_seed(self.generator_seed)
        for _ in range(self.M):
            _, p = self.outer_gradients(network, x, conv1)
            x = self.inner_steps(layer, x, p.detach())
            if self.sigma > 0:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = (x + self.sigma * noise).clamp(-1, 1)
        return x.detach()


class SGLD(Sampler):
    """SGLD as in JEM: x <- x + step * df/dx + noise * N(0, 1), K steps."""

    def __init__(self, K: int = 20, step: float = 1.0, noise: float = 0.01, seed: int = 0):
        if K < 1 or step <= 0 or noise < 0:
            raise ValueError("sgld needs K >= 1, step > 0, noise >= 0")
        self.K, self.step, self.noise, self.generator_seed = K, step, noise, seed
        self.full_passes = 0
        self.first_layer_passes = 0

    def sample(self, network: nn.Module, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = x0.detach()
        generator = generator or torch.Generator(device=x.device).manual_seed(self.generator_seed)
        for _ in range(self.K):
            x = x.requires_grad_(True)
            (grad,) = torch.autograd.grad(network(x).sum(), [x])
            self.full_passes += 1
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = (x + self.step * grad + self.noise * noise).detach()
        return x


class ReplayBuffer(nn.Module):
    """Persistent chains (JEM): draws start from stored samples, a fraction ``reinit`` re-initialised from a
    Gaussian fitted to training data (diagonal, per pixel) or uniform on [-1, 1]. Its tensors are buffers, so
    checkpoints hold the chains and a resumed run continues them."""

    def __init__(self, size: int, shape: tuple[int, ...], reinit: float = 0.05, init: str = "gaussian",
                 rank: int = 0):
        super().__init__()
        if init not in ("gaussian", "uniform"):
            raise ValueError("replay buffer init must be gaussian or uniform")
        if size < 1 or not 0 <= reinit <= 1 or rank < 0:
            raise ValueError("replay buffer needs size >= 1, reinit in [0, 1] and rank >= 0")
        self.size, self.shape, self.reinit, self.init, self.rank = size, tuple(shape), reinit, init, rank
        self.register_buffer("mean", torch.zeros(self.shape))
        self.register_buffer("std", torch.ones(self.shape))
        # low-rank option: covariance = V diag(s^2) V^T + diag(std^2), V (D, rank) the top principal directions
        dim = int(torch.tensor(self.shape).prod())
        self.register_buffer("components", torch.zeros(dim, rank))
        self.register_buffer("samples", torch.zeros((size, *self.shape)))
        self.register_buffer("filled", torch.zeros((), dtype=torch.bool))

    def fit(self, data: Tensor, generator: torch.Generator) -> None:
        """Fit the diagonal Gaussian to training data (N, *shape) in [-1, 1] and fill the buffer from it."""
        self.mean.copy_(data.mean(dim=0))
        if data.shape[0] > 1:
            self.std.copy_(data.std(dim=0).clamp_min(1e-3))
        if self.rank and data.shape[0] > 1:
            centred = (data - self.mean).flatten(1).double()
            q = min(self.rank, *centred.shape)
            _, singular, directions = torch.pca_lowrank(centred, q=q, center=False)
            scaled = directions * (singular / (data.shape[0] - 1) ** 0.5)  # (D, q)
            self.components.zero_()
            self.components[:, :q] = scaled.float()
            explained = (scaled**2).sum(dim=1).view(self.shape).float()
            self.std.copy_((self.std**2 - explained).clamp_min(1e-6).sqrt())
        self.samples.copy_(self.fresh(self.size, generator))
        self.filled.fill_(True)

    def fresh(self, n: int, generator: torch.Generator) -> Tensor:
        device = self.mean.device
        if self.init == "uniform":
            return torch.rand((n, *self.shape), generator=generator, device=device) * 2 - 1
        noise = torch.randn((n, *self.shape), generator=generator, device=device)
        sample = self.mean + self.std * noise
        if self.rank:
            z = torch.randn((n, self.rank), generator=generator, device=device)
            sample = sample + (z @ self.components.T).view(n, *self.shape)
        return sample.clamp(-1, 1)

    def draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(starting points (n, *shape), their buffer indices (n,))."""
        device = self.mean.device
        if not bool(self.filled):
            self.samples.copy_(self.fresh(self.size, generator))
            self.filled.fill_(True)
        index = torch.randint(0, self.size, (n,), generator=generator, device=device)
        start = self.samples[index].clone()
        renew = torch.rand(n, generator=generator, device=device) < self.reinit
        start = torch.where(renew.view(-1, *([1] * len(self.shape))), self.fresh(n, generator), start)
        return start, index

    def store(self, index: Tensor, samples: Tensor) -> None:
        self.samples[index] = samples.detach().to(self.samples.dtype)
