"""Decisions in one place: a threshold policy fitted on validation scores (with its warning), the threshold record
kept beside a checkpoint (threshold.json: the threshold, its fit, the validation scores, and the post-processors
and scorer it holds for), reading it back for a pipeline, and the decision a command or the service uses (the
record, or another policy fitted anew on its stored scores). Run, test, train, update, predict, export and serve
all decide through here; adkit.stats.thresholds holds the policies' arithmetic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adkit.core import console, distributed, files
from adkit.core.errors import AdkitError
from adkit.core.grammar import PipelineSpec
from adkit.core.plugins import get_catalog
from adkit.stats import thresholds

THRESHOLD_FILE = "threshold.json"


def fit_threshold(policy: thresholds.ThresholdPolicy, scores: Tensor, labels: Tensor, category: str,
                  left_out: Tensor | None = None, say: bool = True) -> thresholds.ThresholdFit:
    """The policy fitted on validation scores (normal and, where held out, defective images); a warning when the
    images are too few for the rate asked. ``category`` (or the record's file) starts its messages. ``left_out``:
    training images' scores as if left out of the fit (evaluation.left_out_scores), pooled with the normal
    validation images' for an fpr policy where the checks allow (thresholds.fit_pooled); the fit says which, in
    ``left_out`` (and the terminal, unless ``say`` is False)."""
    scores_np, labels_np = scores.double().numpy(), labels.numpy()
    normal, anomalous = scores_np[labels_np == 0], scores_np[labels_np == 1]
    try:
        if left_out is not None and len(left_out) and policy.kind == "fpr":
            fit = thresholds.fit_pooled(policy, normal, anomalous, left_out.double().numpy())
            if say:
                console.say(f"{category}: threshold: {fit.left_out}")
        else:
            fit = thresholds.fit(policy, normal, anomalous)
    except thresholds.PolicyError as exc:
        raise AdkitError(f"{category}: {exc}") from None
    if fit.warning:
        console.warn(f"{category}: {fit.warning}")
    return fit


def decision_metrics(fit: thresholds.ThresholdFit, scores: Tensor, labels: np.ndarray,
                     defects: list[str]) -> dict[str, Any]:
    """metrics.json's decision fields: the threshold, its policy and validation record, and on a labelled split
    (``labels`` 0 good / 1 defective, ``defects`` each image's defect type) false alarms per 1,000 good parts,
    recall and recall per defect type."""
    point = thresholds.operating_point(scores.numpy(), labels, defects, fit.threshold)
    return {"threshold": fit.threshold, "threshold_policy": fit.policy, "val_normal": fit.n_normal,
            "val_left_out": fit.n_left_out,
            "val_defective": fit.n_anomalous, "val_false_alarms": fit.val_false_alarms, "val_fpr": fit.val_fpr,
            "val_fpr_upper95": fit.val_fpr_upper, "threshold_band": [fit.band_low, fit.band_high],
            "test_false_alarms": point["false_alarms"], "false_alarms_per_1000": point["false_alarms_per_1000"],
            "recall": point["recall"], "recall_by_defect": point["recall_by_defect"]}


def validation_record(fit: thresholds.ThresholdFit, scores: torch.Tensor, labels: torch.Tensor | None,
                      left_out: torch.Tensor | None = None) -> dict[str, Any]:
    """A threshold with its fit and the validation scores it was fitted on (small: one number per image), so that
    another policy can be fitted later without the images (``predict --threshold``); the training images' left-out
    scores where the fit pooled them."""
    labels = torch.zeros(len(scores), dtype=torch.long) if labels is None else labels
    record = {"threshold": fit.threshold, "policy": fit.policy, "fit": fit.as_dict(),
              "val_scores": [float(s) for s in scores.double()], "val_labels": [int(x) for x in labels]}
    if left_out is not None and fit.n_left_out:
        record["left_out_scores"] = [float(s) for s in left_out.double()]
    return record


def kept_left_out(checkpoint_dir: Path, pipeline: PipelineSpec) -> torch.Tensor | None:
    """The left-out training scores the threshold beside a checkpoint pooled, where it was fitted for ``pipeline``'s
    post-processors and scorer (None otherwise, silently: ``adkit test`` fits a threshold of its own)."""
    path = checkpoint_dir / THRESHOLD_FILE
    recorded = json.loads(path.read_text()) if path.is_file() else None
    return left_out_of(recorded) if recorded is not None and _holds_for(recorded, pipeline) else None


def left_out_of(record: dict[str, Any] | None) -> torch.Tensor | None:
    """The left-out training scores a threshold record pooled (None without any)."""
    stored = (record or {}).get("left_out_scores")
    return torch.tensor(stored, dtype=torch.float64) if stored else None


def threshold_file(validation: dict[str, Any], pipeline: PipelineSpec, source: str) -> dict[str, Any]:
    """threshold.json's content: the threshold fitted on validation data (a ``validation_record``), with the
    post-processors and scorer it holds for and where it was fitted."""
    return {**validation, "posts": pipeline.post_texts, "scorer": pipeline.scorer_text, "fitted_on": source}


def record_threshold(checkpoint_dir: Path, validation: dict[str, Any], pipeline: PipelineSpec, source: str) -> None:
    """Write the threshold fitted on validation data (a ``validation_record``) beside the checkpoint, with the
    post-processors and scorer it holds for: ``predict`` and ``export`` read it after ``train``, ``test`` or ``run``
    alike (``run`` writes it with the category's other files: adkit.outputs.artifacts.write_category)."""
    if distributed.is_main():
        files.write_json(checkpoint_dir / THRESHOLD_FILE, threshold_file(validation, pipeline, source))


def threshold_record(checkpoint_dir: Path, pipeline: PipelineSpec) -> dict[str, Any] | None:
    """The recorded threshold.json if it was fitted for the post-processors and scorer of ``pipeline`` (the
    recorded specs parsed and compared as values); None (with a warning when it was fitted for others)
    otherwise."""
    path = checkpoint_dir / THRESHOLD_FILE
    if not path.is_file():
        return None
    recorded = json.loads(path.read_text())
    if not _holds_for(recorded, pipeline):
        console.warn(f"the threshold in {path} was fitted for post-processors {recorded.get('posts')} and scorer "
                    f"{recorded.get('scorer')}, not {pipeline.post_texts} and {pipeline.scorer_text}: it is not used "
                    "(predict writes no decisions, export refuses); run adkit test with these options to fit one")
        return None
    return recorded


def _holds_for(recorded: dict[str, Any], pipeline: PipelineSpec) -> bool:
    """Whether a threshold record's post-processors and scorer are ``pipeline``'s (a spec that no longer parses,
    a plugin gone, is not)."""
    if not isinstance(recorded.get("posts"), list) or not isinstance(recorded.get("scorer"), str):
        return False
    catalog = get_catalog()
    try:
        posts = tuple(catalog["postprocessor"].parse(text) for text in recorded["posts"])
        scorer = catalog["scorer"].parse(recorded["scorer"])
    except AdkitError:
        return False
    return posts == pipeline.posts and scorer == pipeline.scorer


def chosen_threshold(record: dict[str, Any] | None, policy: str | None, where: str) -> dict[str, Any] | None:
    """The decision to use, as a record (threshold, policy, fit and the stored validation scores): ``record`` as it
    is, or ``policy`` fitted anew on the validation scores it stores (value:X needs none); None without any.
    ``where`` names the record's file for errors."""
    if policy is None:
        return None if record is None else {"policy": "quantile:0.99", **record}  # before policies: the 0.99 quantile
    try:
        parsed = thresholds.parse_policy(policy)
    except thresholds.PolicyError as exc:
        raise AdkitError(str(exc)) from None
    stored = record is not None and "val_scores" in record
    if parsed.needs_scores and not stored:
        raise AdkitError(f"--threshold {parsed}: {where} stores no validation scores to fit it on: run adkit test "
                         "--checkpoint CKPT to store them (then export again), or give --threshold value:X")
    scores = torch.tensor(record["val_scores"] if stored else [], dtype=torch.float64)
    labels = torch.tensor(record["val_labels"] if stored else [], dtype=torch.long)
    fit = fit_threshold(parsed, scores, labels, where, left_out_of(record) if parsed.kind == "fpr" else None,
                        say=False)  # the service decides a policy per request: the record says it
    return {**(record or {}), "threshold": fit.threshold, "policy": fit.policy, "fit": fit.as_dict()}


