"""The contract check of an export format (``check_exporter``): the file it writes loads back into a function that
reproduces the exported module at other batch sizes."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adkit.core.plugins import Catalog
from adkit.stats.thresholds import widest_gap
from adkit.testing.contract import _catalog, _expect


class _TinyDeployed(nn.Module):
    """The shape of what ``adkit export`` hands an export format: images and threshold in; map, score and
    decision out (a smoothed grey map, its maximum, score > threshold)."""

    def __init__(self):
        super().__init__()
        self.smooth = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        nn.init.constant_(self.smooth.weight, 1 / 9)

    def forward(self, images: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        maps = self.smooth(images.mean(1, keepdim=True))
        scores = maps.flatten(1).amax(1)
        return maps, scores, scores > threshold


def check_exporter(spec: str, catalog: Catalog | None = None, size: int = 32) -> Any:
    """An export format writes one plain file (``file``: a name, not a path, not model.json) that loads back
    into a function reproducing the module at other batch sizes than the one it was written with: maps and
    scores within 1e-4, decisions equal, CPU tensors of the documented shapes."""
    exporter = _catalog(catalog)["exporter"].create(spec)
    name = getattr(exporter, "file", "")
    _expect(bool(name) and Path(name).name == name and name != "model.json",
            f"{spec}: file must be a plain file name other than model.json, got {name!r}")
    module = _TinyDeployed().eval()
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        example = (torch.rand(2, 3, size, size, generator=generator), torch.tensor(0.5))
        with torch.no_grad():
            exporter.write(module, example, path)
        _expect(path.is_file(), f"{spec}: write() left no file at {path.name}")
        run = exporter.load(path, torch.device("cpu"))
        for batch in (1, 3):
            images = torch.rand(batch, 3, size, size, generator=generator)
            with torch.no_grad():
                scores = module(images, torch.tensor(0.5))[1]
            # thresholds well away from every score (the file's scores may differ from the module's by 1e-4):
            # below all, above all, and in the middle of the widest gap between them (decisions on both sides)
            cut, half_gap = widest_gap(scores)
            margin = 0.1 + 0.1 * float(scores.abs().max())
            cuts = [float(scores.min()) - margin, float(scores.max()) + margin] + ([cut] if half_gap > 1e-3 else [])
            for threshold in cuts:
                with torch.no_grad():
                    expected = module(images, torch.tensor(threshold))
                got = run(images, torch.tensor(threshold))
                _check_export_outputs(spec, got, expected, batch, size)
    return exporter


def _check_export_outputs(spec: str, got: Any, expected: tuple[Tensor, Tensor, Tensor], batch: int, size: int) -> None:
    _expect(isinstance(got, tuple) and len(got) == 3, f"{spec}: load()'s function must return (maps, scores, "
                                                      "decisions)")
    maps, scores, decisions = got
    _expect(all(isinstance(t, Tensor) and t.device.type == "cpu" for t in got), f"{spec}: outputs must be CPU tensors")
    _expect(tuple(maps.shape) == (batch, 1, size, size) and tuple(scores.shape) == (batch,) and
            tuple(decisions.shape) == (batch,) and decisions.dtype == torch.bool,
            f"{spec}: at batch {batch} outputs must be (B, 1, H, W), (B,), (B,) bool; got "
            f"{tuple(maps.shape)}, {tuple(scores.shape)}, {tuple(decisions.shape)} {decisions.dtype}")
    _expect(torch.allclose(maps, expected[0], atol=1e-4) and torch.allclose(scores, expected[1], atol=1e-4)
            and torch.equal(decisions, expected[2]),
            f"{spec}: the loaded file differs from the module at batch {batch} (the batch dimension must stay "
            "dynamic)")
