from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from adkit.stats.metrics import aupro, auroc, f1_max, pro_curve, trapezoid_area


def slow_aupro(maps, masks, limit=0.3):
    """Obvious reference: every distinct score as a threshold (score >= t), regions labelled per image."""
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    normal = ~masks.astype(bool)
    points = [(0.0, 0.0)]
    for t in sorted(np.unique(maps), reverse=True):
        above = maps >= t
        fpr = (above & normal).sum() / normal.sum()
        pro = np.mean([above[i][r].mean() for i, r in regions])
        points.append((fpr, pro))
    x, y = map(np.array, zip(*points))
    return trapezoid_area(x, y, limit) / limit


def test_aupro_matches_slow_reference_on_random_maps():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 12, 12), bool)
    masks[0, 2:5, 2:5] = True
    masks[0, 8:11, 1:3] = True  # two regions of different sizes in one image
    masks[1, 5:12, 5:12] = True
    maps = rng.random((3, 12, 12)).round(2)  # ties included
    maps[masks] += 0.3
    assert aupro(maps, masks) == pytest.approx(slow_aupro(maps, masks), abs=1e-12)


def test_aupro_hand_cases():
    masks = np.zeros((1, 4, 4), bool)
    masks[0, :2, :2] = True
    perfect = masks.astype(float)
    assert aupro(perfect, masks) == pytest.approx(1.0)
    inverted = 1.0 - perfect  # every normal pixel ranks above the region: PRO stays 0 until FPR 1
    assert aupro(inverted, masks) == pytest.approx(0.0)
    # one region: half its pixels score 1 (with no false positives), the rest 0 with all normal pixels
    maps = np.zeros((1, 4, 4))
    maps[0, 0, :2] = 1.0
    # curve: (0,0) -> (0,0.5) -> (1,1); at FPR 0.3 PRO = 0.65; area = 0.3*(0.5+0.65)/2
    assert aupro(maps, masks) == pytest.approx(0.3 * (0.5 + 0.65) / 2 / 0.3)


def test_regions_count_equally():
    masks = np.zeros((1, 10, 10), bool)
    masks[0, 0, 0] = True  # a one-pixel region
    masks[0, 5:9, 5:9] = True  # a 16-pixel region
    maps = np.zeros((1, 10, 10))
    maps[0, 5:9, 5:9] = 1.0  # only the big one found
    _fprs, pros = pro_curve(maps, masks)
    assert pros[1] == pytest.approx(0.5)


def test_f1max_and_auroc_against_hand_values():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    assert auroc(labels, scores) == pytest.approx(0.75)
    f1, threshold = f1_max(labels, scores)
    assert f1 == pytest.approx(0.8) and threshold == pytest.approx(0.35)
    assert np.isnan(auroc(np.zeros(3), np.arange(3)))


def test_aupro_up_to_an_fpr_limit_of_one():
    # ten normal pixels: 0.1 summed ten times is 0.9999999999999999, short of the limit 1.0 before the fix
    maps = np.array([[[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.0]]])
    masks = np.array([[[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]]])
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(1.0)
