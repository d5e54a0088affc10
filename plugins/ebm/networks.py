"""Energy networks: the JEM++ wide ResNet (pre-activation, LeakyReLU 0.2, scalar head), any timm model trained
from scratch, or a pretrained backbone with an energy head."""

from __future__ import annotations

from torch import Tensor, nn

from adkit.plugin import Backbone, EnergyNetwork


class PreActBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, slope: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=True)
        self.act = nn.LeakyReLU(slope)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=True)
                         if stride != 1 or in_channels != out_channels else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.act(self.bn1(x)))
        out = self.conv2(self.act(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNetEnergy(EnergyNetwork):
    """WRN-depth-widen (depth = 6n + 4), pre-activation, LeakyReLU, global pooling, Linear(64 * widen, 1).
    WRN-28-10 has a 36.5 M parameter trunk. Returns f(x) of shape (B,)."""

    def __init__(self, depth: int = 28, widen: int = 10, slope: float = 0.2, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError("wrn depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...)")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=True)
        layers: list[nn.Module] = []
        previous = widths[0]
        for group, stride in zip(range(3), (1, 2, 2)):
            for i in range(n):
                layers.append(PreActBlock(previous, widths[group + 1], stride if i == 0 else 1, slope))
                previous = widths[group + 1]
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(previous)
        self.act = nn.LeakyReLU(slope)
        self.head = nn.Linear(previous, 1)

    def forward(self, x: Tensor) -> Tensor:
        features = self.act(self.bn(self.blocks(self.conv1(x))))
        return self.head(features.mean(dim=(2, 3))).squeeze(1)


class TimmEnergy(EnergyNetwork):
    """Any timm model with one output as f(x); pretrained weights are never downloaded."""

    def __init__(self, name: str):
        super().__init__()
        import timm

        try:
            self.model = timm.create_model(name, pretrained=False, num_classes=1)
        except RuntimeError as exc:  # timm's "Unknown model"
            raise ValueError(f"timm has no model {name!r} ({exc})") from None

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).reshape(x.shape[0])


class InputLayer(nn.Module):
    """x in [-1, 1] -> the trunk's first convolution output z1: the map PYLD's inner steps climb through. The
    trunk normalises its input before that convolution, so the convolution alone is not the map from x."""

    def __init__(self, trunk: Backbone, conv: nn.Conv2d):
        super().__init__()
        self.trunk, self.conv = [trunk], [conv]  # lists: no second registration of the trunk's modules

    def forward(self, x: Tensor) -> Tensor:
        return self.conv[0](self.trunk[0].normalise((x + 1) / 2))


class PretrainedEnergy(EnergyNetwork):
    """f(x) = head(global mean of a pretrained trunk's ``stage`` features) for x in [-1, 1]; the head is
    Linear(C, hidden) - LeakyReLU(0.2) - Linear(hidden, 1). With ``finetune`` the trunk's weights train too (its
    BatchNorm statistics stay frozen); otherwise only the head does. Returns (B,)."""

    def __init__(self, trunk: Backbone, stage: int, hidden: int = 256, finetune: bool = False):
        super().__init__()
        trunk.check_stages((stage,), "ebm trunk_layer")
        self.trunk, self.stage = trunk, stage
        if finetune:
            for parameter in trunk.parameters():
                parameter.requires_grad_(True)
        self.head = nn.Sequential(nn.Linear(trunk.channels[stage], hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
        self._input_layer = InputLayer(trunk, self.first_layer())

    def input_layer(self) -> nn.Module:
        """Normalisation, then the trunk's first convolution: the trunk normalises x before it."""
        return self._input_layer

    def forward(self, x: Tensor) -> Tensor:
        features = self.trunk((x + 1) / 2, (self.stage,))[0]
        return self.head(features.float().mean(dim=(2, 3))).squeeze(1)


def energy_network(backbone: str, depth: int, widen: int) -> nn.Module:
    return WideResNetEnergy(depth, widen) if backbone == "wrn" else TimmEnergy(backbone)


__all__ = ["PretrainedEnergy", "TimmEnergy", "WideResNetEnergy", "energy_network"]
