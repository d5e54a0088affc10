"""``adkit update``: new good images added to a fitted model without refitting it from scratch, written as a new
version beside the old one with its lineage (docs/update.md).

Labelled defective images (``--defects``, and with --from-feedback the kept images reported defective) join a
detector that learns from them (``uses_defects``: PatchCore's defect bank), with their labels only.

The rule for the images given: a tenth of them (at least one from two images on; a shuffle seeded by --seed) is
held out and joins the validation images; the rest is added to the detector (``Detector.update``: merged moments,
a memory bank extended by its coreset rule). The approximations are checked again (``Detector.calibrate``) and the
threshold is fitted anew by its recorded policy on the updated model's scores of the old validation images (the
checkpoint's dataset's validation split, as adkit run made it) and of the held-out new ones. The new checkpoint's
meta carries the lineage: one entry per update, with the parent's sha256, the images added and held out (count
and sha256 each), when, and the command.
"""

from __future__ import annotations

import datetime
import hashlib
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

import adkit
from adkit.app.deployment import image_paths
from adkit.core import console, distributed, files
from adkit.core.checkpoints import load_checkpoint, save_checkpoint
from adkit.core.datasets import Sample, split_validation
from adkit.core.errors import AdkitError
from adkit.core.grammar import split_spec
from adkit.core.plugins import get_catalog
from adkit.data.loading import LoadedSplit, load_defects, load_split
from adkit.outputs.render import normal_images
from adkit.run.assembly import checkpoint_geometry, checkpoint_pipeline, checkpoint_splits, load_trained
from adkit.run.config import RunConfig
from adkit.run.engine import predict as run_pipeline
from adkit.run.engine import update_detector
from adkit.serve.feedback import read_feedback
from adkit.stats import decisions
from adkit.stats.thresholds import DEFAULT_POLICY, parse_policy

HELD_OUT = 0.1  # the share of the new images held out for the threshold and the approximations' check


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def update(config: RunConfig, checkpoint: Path, images: list[Path], out: Path | None = None,
           from_feedback: Path | None = None, defects: list[Path] | None = None) -> Path:
    """Add the good ``images`` to the model at ``checkpoint``, and with ``from_feedback`` (RESULTS_DIR/<product> of
    adkit serve) the kept images reported as false alarms. The labelled defective images ``defects`` (files or
    folders) and the kept images reported defective there join a detector that learns from defects; the reported
    ones are scored by the new version for its recall figure. The new version goes to ``out`` (default: a new
    folder beside the checkpoint's, ``<folder>@<version>``, which adkit serve takes as the product's current
    version). Returns the new version's folder."""
    payload = load_checkpoint(checkpoint)
    meta = payload["meta"]
    name = split_spec(meta["detector"])[0]
    traits = get_catalog()["detector"].get(name).traits
    reported_defects: list[Path] = []
    if from_feedback is not None:
        records = read_feedback(from_feedback)
        kept = [r for r in records if r.get("image")]
        images = [*images, *(from_feedback / r["image"] for r in kept if r["label"] == "good")]
        reported_defects = [from_feedback / r["image"] for r in kept if r["label"] == "defect"]
        if not images and not (traits.uses_defects and reported_defects) and not defects:
            raise AdkitError(f"{from_feedback}: no report of a false alarm whose image was kept: nothing to add")
    if not traits.updatable:
        updatable = ", ".join(i.name for i in get_catalog()["detector"] if i.traits.updatable)
        if traits.trainable:
            raise AdkitError(f"{name} learns its network by training: new images need training, not an update: "
                             f"continue with adkit train --resume, or train again on all the images (adkit update "
                             f"adds images to {updatable})")
        raise AdkitError(f"{name} declares no update: fit it again on all the images with adkit train (adkit update "
                         f"adds images to {updatable})")
    if defects and not traits.uses_defects:
        learners = ", ".join(i.name for i in get_catalog()["detector"] if i.traits.uses_defects and i.traits.updatable)
        raise AdkitError(f"{name} cannot learn from labelled defects: drop --defects (adkit update adds them to "
                         f"{learners or 'no installed detector'})")
    out = out or next_version(checkpoint.parent)
    if out.exists():
        raise AdkitError(f"{out} exists: an update never writes over a model; choose another --out")
    samples = _unique_samples(images) if images else []
    to_learn = [*(defects or []), *(reported_defects if traits.uses_defects else [])]
    labelled = _unique_samples(to_learn, label=1, what="labelled defects") if to_learn else []
    added, held = split_validation(samples, HELD_OUT, config.seed) if samples else ([], [])
    device = distributed.resolve_device(config.device)
    spec = checkpoint_pipeline(config, meta)
    record = decisions.threshold_record(checkpoint.parent, spec)
    pipeline, _ = load_trained(config, checkpoint, device, payload, spec)
    geometry = checkpoint_geometry(meta)
    new = load_split(added, geometry, config.skip_bad)
    learned = load_defects(labelled, geometry, config.skip_bad)
    if not new.samples and learned is None:
        raise AdkitError("no readable images to add")
    validation = _validation(config, payload, load_split(held, geometry, config.skip_bad))
    normal = validation.images[validation.labels == 0]
    batch = config.batch_size or 8
    update_detector(pipeline.detector, geometry.tiles(new.images), batch, device,
                    held_out=geometry.tiles(normal) if len(normal) else None, defects=learned)
    scores = run_pipeline(pipeline, validation.images, max(batch, 8), device, precision=config.precision).scores
    policy = parse_policy(config.threshold or (record or {}).get("policy") or DEFAULT_POLICY)
    # the fit's left-out training scores, as they were measured against the parent (docs/update.md)
    left_out = decisions.left_out_of(record) if policy.kind == "fpr" else None
    fit = decisions.fit_threshold(policy, scores, validation.labels, meta["category"], left_out)
    caught = None
    if reported_defects:  # the defects the line reported: how many the new version flags
        reported = load_split([Sample(p, 1) for p in reported_defects], geometry, skip_bad=True)
        defect_scores = run_pipeline(pipeline, reported.images, max(batch, 8), device, precision=config.precision).scores
        caught = {"reported": len(reported.samples), "caught": int((defect_scores > fit.threshold).sum()),
                  "learned_from": traits.uses_defects}
    step = {"parent_sha256": sha256_of(checkpoint), "parent": str(checkpoint),
            "added": len(new.samples), "added_sha256": [sha256_of(s.path) for s in new.samples],
            "held_out": len(held), "held_out_sha256": [sha256_of(s.path) for s in held],
            "defects_added": len(labelled), "defects_sha256": [sha256_of(s.path) for s in labelled],
            "validation_images": len(validation.samples),
            "from_feedback": None if from_feedback is None else str(from_feedback), "reported_defects": caught,
            "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": shlex.join(["adkit", *sys.argv[1:]]) if Path(sys.argv[0]).name == "adkit" else "adkit.api.update",
            "adkit_version": adkit.__version__}
    version = {**payload, "model": pipeline.detector.checkpoint_state(),
               "backbones": pipeline.detector.backbone_identities(),
               "meta": {**meta, "lineage": [*meta.get("lineage", []), step]}}
    with files.atomic_dir(out) as staging:
        save_checkpoint(staging / "checkpoint.pt", version)
        decisions.record_threshold(staging, decisions.validation_record(fit, scores, validation.labels, left_out), spec,
                                   f"the old validation images and {len(held)} held-out new ones (adkit update)")
    before = "none" if record is None else f"{record['threshold']:.6g}"
    learned_text = f" and {len(labelled)} labelled defects" if labelled else ""
    console.say(f"added {len(new.samples)} images ({len(held)} held out, {len(new.skipped)} unreadable skipped)"
                f"{learned_text} to {checkpoint}; threshold {before} -> {fit.threshold:.6g} ({fit.policy}, on "
                f"{normal_images(fit.n_normal, fit.n_left_out)})")
    for label, approximation in pipeline.detector.all_approximations().items():
        console.say(f"{label}: {approximation['summary']}")
    if caught is not None:
        console.say(f"of {caught['reported']} parts the line reported defective, the new version flags "
                    f"{caught['caught']}" + (" (it learned from them)" if caught["learned_from"] else ""))
    console.say(f"the new version is {out / 'checkpoint.pt'} (lineage: {len(version['meta']['lineage'])} update(s))")
    return out


def next_version(folder: Path) -> Path:
    """The first free ``<name>@<n>`` beside ``folder`` (n from 2; a folder already named ``x@k`` continues)."""
    base, _, number = folder.name.rpartition("@")
    if not base or not number.isdigit():
        base, number = folder.name, "1"
    n = int(number) + 1
    while (folder.parent / f"{base}@{n}").exists():
        n += 1
    return folder.parent / f"{base}@{n}"


def _unique_samples(images: list[Path], label: int = 0, what: str = "images") -> list[Sample]:
    """The image files given (folders expanded), each file content once, in a stable order, with ``label``."""
    seen: set[str] = set()
    samples = []
    for path in image_paths(images):
        digest = sha256_of(path)
        if digest not in seen:
            seen.add(digest)
            samples.append(Sample(path, label))
    if not samples:
        raise AdkitError(f"no {what} to add")
    return samples


def _validation(config: RunConfig, payload: dict[str, Any], held: LoadedSplit) -> LoadedSplit:
    """The old validation images (the checkpoint's dataset's split, rebuilt from its recorded configuration) and
    the held-out new ones, as one split."""
    plan_, splits = checkpoint_splits(config, payload["meta"], "validation images")
    old = load_split(splits.val, plan_.geometry, config.skip_bad)
    if not old.samples and not held.samples:
        raise AdkitError("no validation images: neither the checkpoint's dataset nor the new images (give two or "
                         "more) hold any for the threshold")
    return LoadedSplit(old.samples + held.samples, torch.cat([old.images, held.images]),
                       torch.cat([old.masks, held.masks]), torch.cat([old.labels, held.labels]),
                       old.skipped + held.skipped)
