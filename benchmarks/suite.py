"""The real-data suite for choosing defaults: every built-in detector with its defaults on the three shared real
sets (magnetic tiles, KolektorSDD, ELPV) and the synthetic textures, one ``adkit run`` each, into one table.

    python benchmarks/suite.py                                   # every built-in detector, every set
    python benchmarks/suite.py --detector patchcore --detector padim --set kolektorsdd
    python benchmarks/suite.py --detector patchcore:recall=0 --label "patchcore, unchecked hnsw"
    python benchmarks/suite.py --flags "--image-size 256 --resize squash" --label-suffix ", squash 256"
    python benchmarks/suite.py --detector "patchcore&padim&feature-ebm-image" --flags "--ensemble mean"

A detector spec with ``&`` runs its parts as one ensemble (give ``--ensemble`` in ``--flags``); its row is the
combined score's (fit seconds: the members' summed).

Each run goes to OUT/<set>/<detector spec>/ (a run already there is read, not repeated: delete its folder to
run it again). Detectors with presets run their ``quick`` preset, the CPU budget (``--preset quick``; the
synthetic textures choose it by themselves); the others have none. Categories run one after the other
(``--workers 1``) so that fit seconds and images per second are each run's own on the whole machine.

Columns, per set (the synthetic textures: the mean of their five categories): image AUROC, pixel AUROC and AUPRO
where there are masks, at the default threshold (``fpr:0.01`` on the validation split) the false alarms per
1,000 good test parts and the recall, the recall at exactly 1 % false alarms on the test split (the ROC's
point, independent of where the threshold lands), fit (or training) seconds and test images per second. Then per
detector the mean image AUROC over the four sets and its worst set. Writes OUT/suite.md and OUT/suite.json and
prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SETS = {
    "synthetic": ["--data", "synthetic"],
    "magnetic-tile": ["--data", "mvtec", "--root", "{shared}/magnetic-tile"],
    "kolektorsdd": ["--data", "mvtec", "--root", "{shared}/kolektorsdd"],
    "elpv": ["--data", "folder:normal={shared}/elpv/normal,abnormal={shared}/elpv/abnormal,name=elpv"],
}
BUILT_IN = ("patchcore", "padim", "feature-ebm-image", "feature-ebm-patch", "pixel-gauss", "draem", "ebm-patch",
            "ebm-image")
COLUMNS = ("image_auroc", "pixel_auroc", "aupro", "false_alarms_per_1000", "recall", "recall_at_1pct", "train_s",
           "infer_img_s")


def recall_at_fpr(scores_csv: Path, rate: float = 0.01) -> float | None:
    """The share of defective test images scoring above the lowest threshold that keeps the good test images'
    false-alarm rate at or below ``rate``: the ROC's point at that rate (ties count against)."""
    rows = list(csv.DictReader(scores_csv.open()))
    scores = np.array([float(r["score"]) for r in rows if r["label"] in ("0", "1")])
    labels = np.array([int(r["label"]) for r in rows if r["label"] in ("0", "1")])
    normal, defective = np.sort(scores[labels == 0]), scores[labels == 1]
    if not len(normal) or not len(defective):
        return None
    allowed = int(np.floor(rate * len(normal)))  # false alarms allowed
    threshold = normal[len(normal) - 1 - allowed]  # every good part at or below it passes but `allowed` of them
    return float((defective > threshold).mean())


def run_one(adkit: str, set_name: str, spec: str, out: Path, shared: str, flags: list[str]) -> tuple[float, str]:
    """One ``adkit run``; returns its wall seconds and the tail of its output when it failed."""
    data = [arg.format(shared=shared) for arg in SETS[set_name]]
    detectors = [arg for part in spec.split("&") for arg in ("--detector", part.strip())]
    command = [adkit, "run", *detectors, *data, "--preset", "quick", "--workers", "1", "--out", str(out), *flags]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    (out.parent / f"{out.name}.log").write_text(" ".join(command) + "\n\n" + done.stdout + done.stderr)
    return seconds, "" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["failed"])[-1]


def row_of(out: Path, set_name: str, label: str) -> dict:
    """The suite's row for one run folder: the categories' metrics averaged (fit seconds summed)."""
    if (out / "ensemble").is_dir():  # an ensemble run: the combined score's metrics, per category
        folders = sorted(p for p in (out / "ensemble").iterdir() if (p / "metrics.json").is_file())
        results = [json.loads((p / "metrics.json").read_text()) for p in folders]
        fits = [json.loads(p.read_text()).get("train_s", 0.0) for p in out.glob("*/*/metrics.json")]
        if results:
            results[0]["train_s"] = sum(fits)  # the members' fits, summed once
        base = out / "ensemble"
    else:
        results = json.loads((out / "summary.json").read_text())["results"]
        base = out
    row = {"set": set_name, "detector": label, "categories": len(results)}
    for key in COLUMNS:
        if key == "recall_at_1pct":
            values = [recall_at_fpr(base / r["category"] / "scores.csv") for r in results]
        else:
            values = [r.get(key) for r in results]
        values = [v for v in values if v is not None]
        if values:
            row[key] = float(np.sum(values) if key == "train_s" else np.mean(values))
    searches = [r.get("approximations", {}).get("search", {}).get("used") for r in results]
    if any(searches):
        row["search"] = ", ".join(sorted({s for s in searches if s}))
    return row


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(rows: list[dict]) -> str:
    header = ["set", "detector", "image AUROC", "pixel AUROC", "AUPRO", "FA per 1,000", "recall",
              "recall at 1 % FPR (test)", "fit s", "img/s", "search"]
    digits = {"false_alarms_per_1000": 1, "train_s": 0, "infer_img_s": 1}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["set"], row["detector"], *[fmt(row.get(k), digits.get(k, 3)) for k in COLUMNS],
                 row.get("search", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_detector(rows: list[dict]) -> str:
    lines = ["| detector | mean image AUROC (sets) | worst set | its image AUROC |", "|---|---|---|---|"]
    for label in dict.fromkeys(r["detector"] for r in rows):
        mine = [r for r in rows if r["detector"] == label and r.get("image_auroc") is not None]
        if not mine:
            continue
        worst = min(mine, key=lambda r: r["image_auroc"])
        mean = np.mean([r["image_auroc"] for r in mine])
        lines.append(f"| {label} | {mean:.3f} ({len(mine)}) | {worst['set']} | {worst['image_auroc']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", action="append", default=[], help="a detector spec (repeatable); default: "
                        "every built-in detector")
    parser.add_argument("--set", action="append", default=[], choices=list(SETS), help="repeatable; default: all")
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                        help="the folder holding magnetic-tile, kolektorsdd and elpv")
    parser.add_argument("--out", default="runs/suite")
    parser.add_argument("--flags", default="", help="more adkit run options for every run (one string)")
    parser.add_argument("--label-suffix", default="", help="appended to each detector's name in the table")
    parser.add_argument("--table-only", action="store_true", help="read the runs already there, run nothing")
    parser.add_argument("--adkit", default=str(Path(sys.executable).with_name("adkit")),
                        help="the adkit command to run (default: this environment's)")
    args = parser.parse_args()
    adkit = args.adkit
    out = Path(args.out)
    flags = args.flags.split()
    slug = "".join(c if c.isalnum() or c in "=.-" else "_" for c in args.flags)
    rows = []
    for set_name in args.set or list(SETS):
        for spec in args.detector or BUILT_IN:
            folder = out / set_name / (spec.replace(":", "@").replace(",", "+") + (f"__{slug}" if slug else ""))
            label = spec + args.label_suffix
            if not any((folder / name).is_file() for name in ("summary.json", "bench.json")):  # run, or ensemble
                if args.table_only:
                    continue
                folder.parent.mkdir(parents=True, exist_ok=True)
                seconds, failure = run_one(adkit, set_name, spec, folder, args.shared, flags)
                if failure:
                    print(f"{set_name} {label}: failed after {seconds:.0f} s: {failure}", file=sys.stderr, flush=True)
                    continue
                print(f"{set_name} {label}: {seconds:.0f} s", file=sys.stderr, flush=True)
            rows.append(row_of(folder, set_name, label))
    text = table(rows) + "\n\n" + per_detector(rows) + "\n"
    print(text)
    name = "suite" + (f"-{slug}" if slug else "")
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    print(f"machine: {os.cpu_count()} cores", file=sys.stderr)


if __name__ == "__main__":
    main()
