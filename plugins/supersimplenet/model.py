"""SuperSimpleNet's parts on a feature grid: the upscaled, locally pooled features, the adaptor, the anomalies made
in feature space, the segmentation and classification heads, and the losses (docs/methods/supersimplenet.md).

Shapes: features (B, C, h, w) on the grid; masks (B, 1, h, w) in {0, 1}; labels (B,) in {0, 1}; the map (B, 1, h, w)
and the score (B,) are logits (higher = more anomalous).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adkit.plugin import Backbone, perlin_noise_batch


def grid_features(backbone: Backbone, images: Tensor, layers: Sequence[int], upscale: int) -> Tensor:
    """(B, 3, H, W) -> (B, C, upscale * h0, upscale * w0): every stage bilinearly resized to ``upscale`` times the
    first (shallowest) stage's grid, concatenated over channels, then averaged over 3x3 neighbourhoods (stride 1,
    zero border) so each position sees its neighbours."""
    stages = backbone(images, layers)
    h, w = stages[0].shape[-2:]
    size = (h * upscale, w * upscale)
    resized = [f.float() if f.shape[-2:] == size else
               F.interpolate(f.float(), size=size, mode="bilinear", align_corners=False) for f in stages]
    return F.avg_pool2d(torch.cat(resized, dim=1), 3, stride=1, padding=1)


def xavier(module: nn.Module) -> None:
    """The reference's initialisation: Xavier-normal weights of convolutions and linear layers, BatchNorm scale 1."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_normal_(module.weight)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.constant_(module.weight, 1)


class Heads(nn.Module):
    """The adaptor (a 1x1 convolution C -> C) and, on its output, the segmentation head (1x1 C -> hidden, BatchNorm,
    LeakyReLU 0.2, 1x1 hidden -> 1: the map) and the classification head (a 5x5 convolution over the features and
    the map -> ``dec`` channels, BatchNorm, ReLU; its global max and mean with the map's global max and mean ->
    a linear layer: the score). With ``stop_grad`` the classification head does not push gradients into the map."""

    def __init__(self, channels: int, hidden: int, dec: int, stop_grad: bool):
        super().__init__()
        self.adaptor = nn.Conv2d(channels, channels, 1)
        self.segmentation = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden),
                                          nn.LeakyReLU(0.2), nn.Conv2d(hidden, 1, 1, bias=False))
        self.classification = nn.Sequential(nn.Conv2d(channels + 1, dec, 5, padding=2), nn.BatchNorm2d(dec),
                                            nn.ReLU())
        self.score = nn.Linear(2 * dec + 2, 1)
        self.stop_grad = stop_grad
        self.apply(xavier)

    def adapt(self, features: Tensor) -> Tensor:
        return self.adaptor(features)

    def forward(self, adapted: Tensor) -> tuple[Tensor, Tensor]:
        """Adapted features (B, C, h, w) -> the map (B, 1, h, w) and the score (B,), both logits."""
        anomaly_map = self.segmentation(adapted)
        seen = anomaly_map.detach() if self.stop_grad else anomaly_map
        hidden = self.classification(torch.cat([adapted, seen], dim=1))
        pooled = torch.cat([hidden.amax(dim=(2, 3)), hidden.mean(dim=(2, 3)), seen.amax(dim=(2, 3)),
                            seen.mean(dim=(2, 3))], dim=1)
        return anomaly_map, self.score(pooled)[:, 0]


def perlin_masks(count: int, size: tuple[int, int], threshold: float, generator: torch.Generator,
                 max_scale: int = 5) -> Tensor:
    """(count, 1, h, w) binary masks: Perlin noise on the power-of-two canvas at or above ``size``, with 2^a by 2^b
    cells (a, b drawn from 0..max_scale, at most the canvas), resized to ``size`` and kept where it exceeds
    ``threshold``; half of them, drawn at random, emptied (normal samples)."""
    h, w = size
    canvas = (1 << max(0, (h - 1).bit_length()), 1 << max(0, (w - 1).bit_length()))
    device = generator.device
    scales = torch.randint(0, max_scale + 1, (count, 2), generator=generator, device=device)
    resolutions = torch.minimum(2 ** scales, torch.tensor(canvas, device=device))
    noise = perlin_noise_batch(resolutions, canvas, int(resolutions.max()), generator)[:, None]
    if canvas != size:
        noise = F.interpolate(noise, size=size, mode="bilinear", align_corners=False)
    masks = (noise > threshold).float()
    keep = (torch.rand(count, generator=generator, device=device) < 0.5).float()
    return masks * keep[:, None, None, None]


def synthetic_anomalies(adapted: Tensor, masks: Tensor, labels: Tensor, known: Tensor, std: float, threshold: float,
                        generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The batch twice, each copy with Gaussian noise (std ``std``) added to the adapted features inside its own
    Perlin mask (half of the masks empty), on top of any real defect: returns features (2B, C, h, w), masks and
    labels updated with the noise's regions, and ``known`` (2B,): whether a sample's map target is known (a real
    defect given with its image label only has an unknown mask)."""
    b = adapted.shape[0]
    features = torch.cat([adapted, adapted])
    noise_regions = perlin_masks(2 * b, tuple(adapted.shape[-2:]), threshold, generator)
    noise = torch.randn(features.shape, generator=generator, device=generator.device).to(features) * std
    features = features + noise * noise_regions
    masks = ((torch.cat([masks, masks]) + noise_regions) > 0).float()
    labels = ((torch.cat([labels, labels]) + noise_regions.flatten(1).amax(1)) > 0).float()
    return features, masks, labels, torch.cat([known, known])


def binary_focal(logits: Tensor, targets: Tensor, gamma: float = 4.0) -> Tensor:
    """Mean focal loss on sigmoid probabilities p: -(1 - p_t)^gamma log p_t, p_t = p for targets 1 and 1 - p for
    0 (no class weighting), computed from the logits for stability."""
    targets = targets.float()
    log_p = F.logsigmoid(logits.float())
    log_not_p = F.logsigmoid(-logits.float())
    log_pt = targets * log_p + (1 - targets) * log_not_p
    return (-(1 - log_pt.exp()) ** gamma * log_pt).mean()


def truncated_l1(logits: Tensor, masks: Tensor, margin: float = 0.5) -> Tensor:
    """The map's truncated L1: normal positions pushed below -margin, anomalous ones above +margin; the mean of
    max(0, map + margin) over normal positions plus the mean of max(0, margin - map) over anomalous ones (a term
    with no positions is 0)."""
    logits = logits.float()
    normal, anomalous = logits[masks <= 0], logits[masks > 0]
    below = (normal + margin).clamp_min(0).mean() if normal.numel() else logits.new_zeros(())
    above = (margin - anomalous).clamp_min(0).mean() if anomalous.numel() else logits.new_zeros(())
    return below + above
