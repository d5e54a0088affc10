"""Everything the CLI does, callable from Python: a facade over the modules that do it.

    from adkit import api
    from adkit.run.config import RunConfig
    api.run(RunConfig(detector=["patchcore"], data="folder", normal="good/", abnormal="bad/"))

The workflows (``run``, ``train``, ``test``, ``predict``, ``update``, ``bench``, ``synth``) take a :class:`RunConfig`; the
building blocks below them (planning, assembling, evaluating one category) are exported for scripts and
benchmarks. Where each lives: docs/architecture.md.
"""

from __future__ import annotations

from adkit.app.bench import bench
from adkit.app.deployment import export, predict, synth
from adkit.app.update import update
from adkit.app.workflows import run, test, train
from adkit.core.plugins import Catalog, get_catalog
from adkit.outputs import render
from adkit.outputs.artifacts import score_rows
from adkit.run.assembly import build_detector, build_pipeline, load_trained
from adkit.run.evaluation import CategoryRun, Evaluation, evaluate, train_category
from adkit.run.planning import RunPlan, plan
from adkit.stats.decisions import chosen_threshold, record_threshold, threshold_record, validation_record

__all__ = [
    "CategoryRun", "Evaluation", "RunPlan", "bench", "build_detector", "build_pipeline", "chosen_threshold",
    "evaluate", "export", "load_trained", "plan", "predict", "print_plugins", "record_threshold", "run",
    "score_rows", "synth", "test", "threshold_record", "train", "train_category", "update", "validation_record",
]


def print_plugins(show_all: bool = False, catalog: Catalog | None = None, as_json: bool = False) -> None:
    """The plugins and every registered component (with parameters when ``show_all``; JSON with ``as_json``)."""
    catalog = catalog or get_catalog()
    catalog.load_components()  # their statuses and warnings are known once their hooks have run
    render.print_plugins(catalog, show_all=show_all, as_json=as_json)
