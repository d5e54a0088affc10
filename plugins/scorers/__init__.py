"""Scorers: reduce an anomaly map (B, 1, H, W) to image scores (B,).

The hooks import the components when they run: importing this module (plugin discovery, adkit --help) stays
cheap.
"""

from __future__ import annotations

from adkit.plugin import hookimpl


@hookimpl
def register_scorers(register):
    from adkit_plugins.scorers.components import MaxMinScorer, MaxScorer, MeanScorer, TopKMeanScorer

    register("max", MaxScorer)
    register("maxmin", MaxMinScorer)
    register("topk-mean", TopKMeanScorer)
    register("mean", MeanScorer)
