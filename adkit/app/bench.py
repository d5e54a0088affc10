"""``adkit bench``: a configuration over categories and a grid of settings, trained once per training setting
and re-scored for post-processor and scorer changes."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from adkit.app.workflows import joined
from adkit.core import console, distributed
from adkit.core.errors import AdkitError
from adkit.core.grammar import split_chain, split_top_level, unwrap
from adkit.outputs import artifacts, pages, render
from adkit.run.assembly import build_pipeline
from adkit.run.config import RunConfig
from adkit.run.evaluation import evaluate, train_category
from adkit.run.planning import RunPlan, claim_output, output_dir, plan

# grid axes that need a training of their own; post and scorer only re-score
TRAIN_AXES = ("detector", "loss", "preset", "seed")
SCORE_AXES = ("post", "scorer")


@joined
def bench(config: RunConfig, grid: list[str]) -> list[dict[str, Any]]:
    """Run a configuration over categories; with ``grid`` axes (key=v1,v2) run every combination, training
    once per detector/loss setting and re-scoring for post/scorer changes. Under torchrun the jobs (category x
    training setting) are dealt to the ranks round-robin, each trained by one rank alone, and rank 0 gathers the
    rows into the table a single process would write."""
    axes = parse_grid(grid)
    train_keys = [k for k in axes if k in TRAIN_AXES]
    score_keys = [k for k in axes if k in SCORE_AXES]
    base = plan(config)
    check_score_axes(base, axes)  # a misspelled post-processor or scorer fails before any training
    out = output_dir(base.config, "bench")
    claim_output(out, resume=False)
    jobs: list[tuple[tuple[str, ...], RunPlan, str]] = []
    for train_values in itertools.product(*(axes[k] for k in train_keys)):
        train_cfg = config
        for key, value in zip(train_keys, train_values):
            train_cfg = apply_axis(train_cfg, key, value)
        plan_ = plan(train_cfg)
        jobs += [(train_values, plan_, category) for category in plan_.categories]
    mine: list[tuple[int, list[dict[str, Any]]]] = []
    workers, me = distributed.process_count(), distributed.process_rank()
    with distributed.alone():
        for job in range(me, len(jobs), workers):
            train_values, plan_, category = jobs[job]
            where = f" (rank {me})" if workers > 1 else ""
            console.say(f"bench job {job + 1}/{len(jobs)}{where}: {category} " +
                       " ".join(f"{k}={v}" for k, v in zip(train_keys, train_values)))
            mine.append((job, _bench_job(plan_, category, out, train_keys, train_values, score_keys, axes)))
    gathered = [item for part in distributed.all_gather_objects(mine) for item in part]
    rows = [row for _, job_rows in sorted(gathered, key=lambda item: item[0]) for row in job_rows]
    if distributed.is_main():
        render.print_bench(rows)
        artifacts.write_bench(out, rows)
        pages.build(out)
        console.say(f"bench results in {out} (open {out / pages.PAGE})")
    return rows


def _bench_job(plan_: RunPlan, category: str, out: Path, train_keys: list[str], train_values: tuple[str, ...],
               score_keys: list[str], axes: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Train one category with one training setting, then score it with every post/scorer combination."""
    name = "-".join(str(v).replace(":", "_").replace("+", "_") for v in train_values) or "base"
    folder = out / name / category
    run_ = train_category(plan_, category, folder)
    rows = []
    for score_values in itertools.product(*(axes[k] for k in score_keys)):
        spec = plan_.pipeline
        for key, value in zip(score_keys, score_values):
            if key == "post":
                spec = spec.rescored(posts=plan_.catalog.checked_posts(post_chain(value)))
            else:
                spec = spec.rescored(scorer=plan_.catalog.checked("scorer", value))
        label = " ".join(f"{k}={v}" for k, v in zip(train_keys + score_keys, train_values + score_values))
        evaluation = evaluate(plan_, run_, build_pipeline(plan_, run_.detector, spec), spec)
        row = {"configuration": label or str(plan_.detector), **evaluation.metrics}
        # each re-scoring combination gets its own folder beside the checkpoint (curves, scores, gallery), so
        # the page can show every combination's maps side by side
        where = folder / combination_folder(score_keys, score_values) if score_keys else folder
        artifacts.write_category(run_.test, category, evaluation, where)
        row["folder"] = str(where.relative_to(out))  # the report links the row to these files
        if score_keys:
            row["trained_in"] = str(folder.relative_to(out))
        rows.append(row)
    return rows


def combination_folder(keys: list[str], values: tuple[str, ...]) -> str:
    """A folder name for one re-scoring combination (``post=avgpool_kernel_5-scorer=max``): letters, digits and
    ``=._-`` only."""
    text = "-".join(f"{k}={v}" for k, v in zip(keys, values))
    return "".join(c if c.isalnum() or c in "=._-" else "_" for c in text)


def parse_grid(grid: list[str]) -> dict[str, list[str]]:
    """``KEY=v1,v2`` items -> {KEY: [v1, v2]}, KEY one of TRAIN_AXES or SCORE_AXES."""
    axes: dict[str, list[str]] = {}
    for item in grid:
        key, eq, values = item.partition("=")
        key = key.strip()
        if not eq or key not in (*TRAIN_AXES, *SCORE_AXES):
            raise AdkitError(f"--grid {item!r}: write KEY=v1,v2 with KEY one of "
                             f"{', '.join((*TRAIN_AXES, *SCORE_AXES))}")
        axes[key] = [unwrap(v) for v in split_top_level(values, ",", f"--grid {item!r}") if v.strip()]
        if not axes[key]:
            raise AdkitError(f"--grid {item!r} has no values")
        if key == "seed" and not all(v.isdigit() for v in axes[key]):
            raise AdkitError(f"--grid {item!r}: seeds are non-negative integers")
    return axes


def post_chain(value: str) -> list[str]:
    """A post axis value: ``none`` or a '+' chain of post-processor specs."""
    return [] if value == "none" else split_chain(value, f"--grid post={value}")


def check_score_axes(base: RunPlan, axes: dict[str, list[str]]) -> None:
    """Build every post-processor and scorer a grid names once, so that a bad value fails now, not after the
    first training."""
    for value in axes.get("post", []):
        for spec in post_chain(value):
            base.catalog["postprocessor"].create(spec)
    for value in axes.get("scorer", []):
        base.catalog["scorer"].create(value)


def apply_axis(config: RunConfig, key: str, value: str) -> RunConfig:
    """``config`` with one training axis set."""
    if key == "detector":
        return config.replace(detector=[value])
    if key == "preset":
        return config.replace(preset=value)
    if key == "seed":
        return config.replace(seed=int(value))
    # loss: "default" keeps the detector's losses; "default+color+psnr" adds; names without "default" replace
    parts = split_chain(value, f"--grid loss={value}")
    if "default" in parts:
        return config.replace(loss=[p for p in parts if p != "default"], loss_only=False)
    return config.replace(loss=parts, loss_only=True)
