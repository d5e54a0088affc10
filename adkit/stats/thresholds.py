"""Decision thresholds: a policy (how one is fitted), its fit on validation scores, and what it means in parts.

A decision is ``score > threshold``. Policies, written ``fpr:RATE``, ``f1`` or ``value:X``:

- ``fpr:RATE`` (the default, ``fpr:0.01``): on the normal validation images, the lowest threshold whose
  false-alarm rate is at most RATE. The rate a few dozen images can promise is uncertain: the fit carries the
  one-sided 95 % Clopper-Pearson upper bound of the validation false-alarm rate, and the 95 % distribution-free
  confidence band of the (1 - RATE) quantile of normal scores (order statistics), where the threshold estimates it.
  Training images scored as if left out of the fit join the validation images where two checks allow
  (``fit_pooled``; docs/thresholds.md).
- ``f1``: the best F1 on labelled validation images (normal and defective); it needs defective validation images.
- ``value:X``: a threshold set by hand.

Stable at the boundary: a fitted threshold never equals a validation score. Every threshold between two adjacent
distinct validation scores makes the same validation decisions, so the fit takes the midpoint of that gap (above
the highest score: half the gap between the two highest distinct scores beyond it). Scores that move by less than
half the gap (other devices, batch sizes, eager against exported runs) keep their decisions. The threshold is
stored as a float32 value, the precision the models compare scores in, so every runner decides alike.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from scipy import stats

DEFAULT_POLICY = "fpr:0.01"
CONFIDENCE = 0.95
# the level of the two checks (fit_pooled) below which left-out training scores are not pooled with the validation
# images'
LEFT_OUT_LEVEL = 0.01
POLICY_HELP = "fpr:RATE (0 < RATE < 1, e.g. fpr:0.01), f1 (needs defective validation images) or value:X"


class PolicyError(ValueError):
    """A policy text that cannot be read, or a fit the data cannot support; the message names the fix."""


@dataclass(frozen=True)
class ThresholdPolicy:
    """A parsed policy: ``kind`` fpr, f1 or value, with its rate or value."""

    kind: str
    value: float | None = None

    def __str__(self) -> str:
        """The canonical text: parse(str(p)) == p."""
        return self.kind if self.value is None else f"{self.kind}:{self.value!r}"

    @property
    def needs_scores(self) -> bool:
        """Whether fitting needs validation scores (all but value:X)."""
        return self.kind != "value"


def parse_policy(text: str) -> ThresholdPolicy:
    """``fpr:0.01`` / ``f1`` / ``value:0.37`` -> ThresholdPolicy; PolicyError naming the fix otherwise."""
    raw = str(text).strip()
    kind, sep, arg = raw.partition(":")
    kind = kind.strip().lower()
    if kind == "f1":
        if sep:
            raise PolicyError(f"--threshold {raw}: f1 takes no value; write f1")
        return ThresholdPolicy("f1")
    if kind not in ("fpr", "value") or not sep:
        raise PolicyError(f"--threshold {raw}: write {POLICY_HELP}")
    try:
        number = float(arg)
    except ValueError:
        raise PolicyError(f"--threshold {raw}: {arg!r} is not a number; write {POLICY_HELP}") from None
    if not math.isfinite(number):
        raise PolicyError(f"--threshold {raw}: the value must be finite")
    if kind == "fpr" and not 0 < number < 1:
        raise PolicyError(f"--threshold {raw}: a false-alarm rate lies strictly between 0 and 1 (e.g. fpr:0.01 "
                          "for one false alarm in a hundred good parts)")
    return ThresholdPolicy(kind, number)


@dataclass(frozen=True)
class ThresholdFit:
    """A threshold and what its validation data say of it. ``below`` / ``above`` are the adjacent validation
    scores it separates (normal ones for fpr; None past either end); ``band`` the 95 % band of the estimated quantile (fpr only;
    ``band_high`` None when it reaches past the highest validation score)."""

    policy: str
    threshold: float
    n_normal: int
    n_anomalous: int
    val_false_alarms: int | None
    val_fpr: float | None
    val_fpr_upper: float | None  # one-sided 95 % Clopper-Pearson upper bound of the false-alarm rate
    val_recall: float | None
    below: float | None
    above: float | None
    band_low: float | None
    band_high: float | None
    warning: str | None
    n_left_out: int = 0  # of n_normal: training images scored as if left out of the fit (pooled, fpr only)
    left_out: str | None = None  # the left-out scores' check against the validation images, in one line

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def clopper_pearson_upper(false_alarms: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided upper confidence bound of a binomial rate: ``false_alarms`` of ``n``. With none it is
    1 - (1 - confidence) ** (1 / n)."""
    if n <= 0:
        return 1.0
    if false_alarms >= n:
        return 1.0
    return float(stats.beta.ppf(confidence, false_alarms + 1, n - false_alarms))


def quantile_band(normal: np.ndarray, rate: float, confidence: float = CONFIDENCE) -> tuple[float, float | None]:
    """Distribution-free two-sided band of the (1 - rate) quantile of the normal scores from order statistics:
    (x_(l), x_(u)) with l, u the binomial quantiles; the upper end is None when it lies past the highest score."""
    x = np.sort(np.asarray(normal, dtype=np.float64))
    n, p, tail = x.size, 1.0 - rate, (1.0 - confidence) / 2
    low = int(stats.binom.ppf(tail, n, p))  # order statistic (1-based) at or below the quantile
    high = int(stats.binom.ppf(1 - tail, n, p)) + 1
    return float(x[max(low, 1) - 1]), (float(x[high - 1]) if high <= n else None)


def left_out_agree(validation: np.ndarray, left_out: np.ndarray,
                   level: float = LEFT_OUT_LEVEL) -> tuple[bool, str]:
    """Whether training images' left-out scores may join the normal validation images' for an fpr threshold:
    the two-sample Kolmogorov-Smirnov test does not tell them apart at ``level`` (two-sided). (verdict, one line
    saying what was measured)."""
    validation = np.asarray(validation, dtype=np.float64).ravel()
    left_out = np.asarray(left_out, dtype=np.float64).ravel()
    if validation.size < 2 or left_out.size < 2 or not np.isfinite(left_out).all():
        return False, (f"not pooled: {left_out.size} left-out training scores, {validation.size} normal validation "
                       "images (at least 2 finite each needed to compare them)")
    test = stats.ks_2samp(left_out, validation)
    side = "higher" if np.median(left_out) > np.median(validation) else "lower"
    measured = (f"{left_out.size} training images' left-out scores against {validation.size} normal validation "
                f"images: Kolmogorov-Smirnov D={test.statistic:.3f}, p={test.pvalue:.3g}, median {side}")
    if test.pvalue < level:
        return False, f"not pooled, they differ ({measured}; p < {level:g})"
    return True, f"pooled ({measured}; alike at the {level:g} level)"


def fit_pooled(policy: ThresholdPolicy | str, normal: np.ndarray, anomalous: np.ndarray | None,
               left_out: np.ndarray, level: float = LEFT_OUT_LEVEL) -> ThresholdFit:
    """``fit`` on the normal validation scores pooled with training images' left-out scores, where both checks
    pass: the two-sample test (``left_out_agree``), and at the pooled threshold the validation images' own false
    alarms, which must not exceed what the rate allows at ``level`` (one-sided binomial: left-out scores whose upper
    tail runs below the validation images' would put the threshold where these flag too many). Otherwise ``fit``
    on the validation scores alone. The fit says which and why (``left_out``) and how many joined (``n_left_out``)."""
    policy = parse_policy(policy) if isinstance(policy, str) else policy
    normal = np.asarray(normal, dtype=np.float64).ravel()
    left_out = np.asarray(left_out, dtype=np.float64).ravel()
    pooled, note = left_out_agree(normal, left_out, level)
    if pooled:
        fitted = fit(policy, np.concatenate([normal, left_out]), anomalous)
        flagged = int((normal > fitted.threshold).sum())
        chance = float(stats.binom.sf(flagged - 1, normal.size, policy.value)) if flagged else 1.0
        if chance >= level:
            return replace(fitted, n_left_out=left_out.size, left_out=note)
        note = (f"not pooled: at the pooled threshold {flagged} of the {normal.size} normal validation images are "
                f"flagged, more than {policy} allows (binomial p={chance:.3g} < {level:g}; {note})")
    return replace(fit(policy, normal, anomalous), left_out=note)


def _float32(value: float) -> float:
    return float(np.float32(value))


def _between(low: float, high: float) -> float:
    """A float32 threshold strictly inside (low, high) near its midpoint where float32 can hold one."""
    mid = _float32(low + (high - low) / 2)
    if low < mid < high:
        return mid
    return float(np.nextafter(np.float32(low), np.float32(np.inf)))  # the gap is below float32's resolution


def _past_top(distinct: np.ndarray) -> float:
    """Above the highest score by half the gap between the two highest distinct scores (1e-3 of the score's
    magnitude when all scores are equal)."""
    top = float(distinct[-1])
    gap = float(distinct[-1] - distinct[-2]) if distinct.size > 1 else 2e-3 * max(abs(top), 1e-12)
    return _between(top, top + gap)


def _past_bottom(distinct: np.ndarray) -> float:
    bottom = float(distinct[0])
    gap = float(distinct[1] - distinct[0]) if distinct.size > 1 else 2e-3 * max(abs(bottom), 1e-12)
    return _between(bottom - gap, bottom)


def _neighbours(values: np.ndarray, threshold: float) -> tuple[float | None, float | None]:
    lower, upper = values[values <= threshold], values[values > threshold]
    return (float(lower.max()) if lower.size else None), (float(upper.min()) if upper.size else None)


def fit(policy: ThresholdPolicy | str, normal_scores: np.ndarray,
        anomalous_scores: np.ndarray | None = None) -> ThresholdFit:
    """Fit ``policy`` on validation scores: normal images' and (for f1) defective images'."""
    policy = parse_policy(policy) if isinstance(policy, str) else policy
    normal = np.asarray(normal_scores, dtype=np.float64).ravel()
    anomalous = np.asarray(anomalous_scores if anomalous_scores is not None else [], dtype=np.float64).ravel()
    if policy.kind == "value":
        threshold = _float32(policy.value)
    elif policy.kind == "fpr":
        if normal.size == 0:
            raise PolicyError(f"--threshold {policy} needs scores of normal validation images, and there are none")
        threshold = _fit_fpr(normal, policy.value)
    else:
        if normal.size == 0 or anomalous.size == 0:
            raise PolicyError(f"--threshold f1 needs normal and defective validation images (found {normal.size} "
                              f"normal, {anomalous.size} defective): use fpr:RATE, or hold defective images out "
                              "for validation (--data mvtec:val_defects=0.2)")
        threshold = _fit_f1(normal, anomalous)
    return describe(str(policy), threshold, normal, anomalous)


def _fit_fpr(normal: np.ndarray, rate: float) -> float:
    distinct, counts = np.unique(normal, return_counts=True)
    above = normal.size - np.cumsum(counts)  # false alarms with the threshold at each distinct score
    allowed = math.floor(rate * normal.size + 1e-9)
    first = int(np.argmax(above <= allowed))  # the lowest score whose false alarms are within the rate
    if first == distinct.size - 1:
        return _past_top(distinct)
    return _between(float(distinct[first]), float(distinct[first + 1]))


def _fit_f1(normal: np.ndarray, anomalous: np.ndarray) -> float:
    distinct = np.unique(np.concatenate([normal, anomalous]))
    normal_sorted, anomalous_sorted = np.sort(normal), np.sort(anomalous)
    # cut j: decide "anomalous" above distinct[j - 1] (j = 0: everything); F1 = 2 tp / (2 tp + fp + fn)
    cuts = np.concatenate([[-np.inf], distinct])
    tp = anomalous.size - np.searchsorted(anomalous_sorted, cuts, side="right")
    fp = normal.size - np.searchsorted(normal_sorted, cuts, side="right")
    f1 = 2 * tp / np.maximum(2 * tp + fp + (anomalous.size - tp), 1)
    best = int(np.flatnonzero(f1 == f1.max())[-1])  # among equals, the highest threshold: fewer false alarms
    if best == 0:
        return _past_bottom(distinct)
    if best == distinct.size:
        return _past_top(distinct)
    return _between(float(distinct[best - 1]), float(distinct[best]))


def describe(policy: str, threshold: float, normal: np.ndarray, anomalous: np.ndarray | None = None) -> ThresholdFit:
    """What the validation scores say of ``threshold``: its false alarms with their upper bound, the recall on
    defective validation images, the scores either side, and (fpr) the band and a warning for too few images."""
    normal = np.asarray(normal, dtype=np.float64).ravel()
    anomalous = np.asarray(anomalous if anomalous is not None else [], dtype=np.float64).ravel()
    parsed = parse_policy(policy)
    fitted_on = normal if parsed.kind == "fpr" else np.concatenate([normal, anomalous])  # the gap it was placed in
    below, above = _neighbours(fitted_on, threshold) if fitted_on.size else (None, None)
    false_alarms = int((normal > threshold).sum()) if normal.size else None
    fpr = false_alarms / normal.size if normal.size else None
    upper = clopper_pearson_upper(false_alarms, normal.size) if normal.size else None
    recall = float((anomalous > threshold).mean()) if anomalous.size else None
    band_low = band_high = None
    warning = None
    if parsed.kind == "fpr" and normal.size:
        band_low, band_high = quantile_band(normal, parsed.value)
        if normal.size * parsed.value < 1:
            needed = math.ceil(math.log(1 - CONFIDENCE) / math.log(1 - parsed.value))
            warning = (f"{normal.size} normal validation images are too few for {policy}: one false alarm would be "
                       f"{1 / normal.size:.2g} of them, and with none the rate is only known to be below "
                       f"{upper:.2g} (95 %); about {needed} are needed to show a rate below {parsed.value:g}")
    return ThresholdFit(policy, float(threshold), int(normal.size), int(anomalous.size), false_alarms, fpr, upper,
                        recall, below, above, band_low, band_high, warning)


def widest_gap(scores: torch.Tensor) -> tuple[float, float]:
    """(a threshold in the middle of the widest gap between adjacent scores, half that gap): where every score's
    decision is as far from rounding as these scores allow. One score: (that score, 0)."""
    ordered = scores.float().sort().values
    if len(ordered) < 2:
        return float(ordered[0]), 0.0
    gaps = ordered[1:] - ordered[:-1]
    i = int(gaps.argmax())
    return float(ordered[i] + gaps[i] / 2), float(gaps[i] / 2)


def decide(scores: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Decisions (N,) bool, score > threshold, compared in float32 as the deployed models compare; all False
    without a threshold."""
    if threshold is None:
        return torch.zeros(scores.shape, dtype=torch.bool)
    return scores.float() > torch.tensor(threshold, dtype=torch.float32)


def operating_point(scores: np.ndarray, labels: np.ndarray, defects: list[str], threshold: float) -> dict[str, Any]:
    """At ``threshold`` on a labelled split: false alarms per 1,000 good parts, the share of defective parts
    caught (recall) and the recall per defect type."""
    flagged = decide(torch.as_tensor(np.asarray(scores, dtype=np.float32)), threshold).numpy()
    labels = np.asarray(labels)
    good, bad = labels == 0, labels == 1
    out: dict[str, Any] = {
        "false_alarms": int((flagged & good).sum()), "n_good": int(good.sum()),
        "false_alarms_per_1000": float(1000 * (flagged & good).sum() / good.sum()) if good.any() else float("nan"),
        "recall": float((flagged & bad).sum() / bad.sum()) if bad.any() else float("nan"),
    }
    by_defect: dict[str, float] = {}
    for defect in sorted({d for d, label in zip(defects, labels) if label == 1}):
        rows = np.array([d == defect and label == 1 for d, label in zip(defects, labels)])
        by_defect[defect] = float(flagged[rows].mean())
    out["recall_by_defect"] = by_defect
    return out
