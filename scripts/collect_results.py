"""Turn a sweep directory into tables and a plot.

    python scripts/collect_results.py multirun/2026-11-26/13-00-00
    python scripts/collect_results.py outputs/2026-11-26 --out results/   # any folder holding run dirs

Every run directory below the given folder (one with a ``summary.json``, or a Hydra job that failed before
writing one) becomes one row: its command-line overrides, best and final top-1, achieved sparsity and
throughput. Writes ``results.md`` (per-job table, then mean +- std over seeds), ``results.csv`` and
``accuracy_vs_sparsity.png`` into ``--out`` (default: the swept folder) and prints the Markdown.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
from collections import defaultdict
from typing import Any

import yaml

COLUMNS = (
    "job",
    "overrides",
    "status",
    "method",
    "model",
    "data",
    "sparsity",
    "seed",
    "val_top1_best",
    "val_top1_final",
    "sparsity_effective",
    "train_images_per_s",
    "infer_images_per_s",
    "wall_time_s",
)


def find_runs(root: str) -> list[str]:
    """Run directories under ``root``: folders with ``summary.json`` or a Hydra ``.hydra/`` record."""
    runs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("wandb", "checkpoints"))
        if "summary.json" in filenames or ".hydra" in dirnames:
            runs.append(dirpath)
            dirnames[:] = []  # a run's own sub-folders are not runs
    return sorted(runs, key=_job_sort_key)


def _job_sort_key(path: str) -> tuple:
    parts = os.path.normpath(path).split(os.sep)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def display_root(root: str) -> str:
    """``root`` as results files name it: from Hydra's ``multirun``/``outputs`` folder on, else its last part.

    Results are committed and shared, so they never carry an absolute path of the machine that wrote them.
    """
    parts = os.path.normpath(os.path.abspath(root)).split(os.sep)
    for anchor in ("multirun", "outputs"):
        if anchor in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(anchor) :])
    return parts[-1]


def read_run(run_dir: str, root: str) -> dict[str, Any]:
    """One table row for ``run_dir``."""
    overrides: list[str] = []
    path = os.path.join(run_dir, ".hydra", "overrides.yaml")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            overrides = [str(o) for o in (yaml.safe_load(fh) or [])]
    row: dict[str, Any] = {k: "" for k in COLUMNS}
    row["job"] = os.path.relpath(run_dir, root) if run_dir != root else os.path.basename(run_dir)
    row["overrides"] = " ".join(o for o in overrides if not o.startswith("hydra."))
    summary_path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(summary_path):
        row["status"] = "failed"
        return row
    with open(summary_path, encoding="utf-8") as fh:
        summary = json.load(fh)
    row["status"] = "ok"
    for key in COLUMNS:
        if key in summary:
            row[key] = summary[key]
    return row


def _fmt(value: Any, key: str) -> str:
    if isinstance(value, float):
        if key.startswith("val_"):
            return f"{value:.2f}"
        if key.startswith("sparsity"):
            return f"{value:.4f}" if key != "sparsity" else f"{value:g}"
        return f"{value:,.1f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: tuple[str, ...] | list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, ""), c) for c in columns) + " |")
    return "\n".join(lines)


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds for runs that differ only in their seed."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["status"] != "ok":
            continue
        config = " ".join(o for o in str(row["overrides"]).split() if not o.startswith("seed="))
        groups[(row["method"], row["model"], row["data"], row["sparsity"], config)].append(row)
    out = []
    for (method, model, data, sparsity, config), members in groups.items():
        entry: dict[str, Any] = {
            "method": method,
            "model": model,
            "data": data,
            "sparsity": sparsity,
            "config": config,
            "seeds": len(members),
        }
        for key in ("val_top1_best", "val_top1_final", "train_images_per_s", "infer_images_per_s"):
            values = [float(m[key]) for m in members if m.get(key) not in ("", None)]
            entry[key] = statistics.mean(values) if values else math.nan
            entry[key + "_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return sorted(out, key=lambda e: (str(e["method"]), str(e["model"]), float(e["sparsity"] or 0), e["config"]))


def aggregate_markdown(groups: list[dict[str, Any]]) -> str:
    lines = [
        "| method | model | data | sparsity | config | seeds | top-1 final | top-1 best | train img/s | infer img/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        lines.append(
            f"| {g['method']} | {g['model']} | {g['data']} | {g['sparsity']:g} | {g['config']} | {g['seeds']} | "
            f"{g['val_top1_final']:.2f} +- {g['val_top1_final_std']:.2f} | "
            f"{g['val_top1_best']:.2f} +- {g['val_top1_best_std']:.2f} | "
            f"{g['train_images_per_s']:,.1f} | {g['infer_images_per_s']:,.1f} |"
        )
    return "\n".join(lines)


def plot(groups: list[dict[str, Any]], path: str) -> None:
    """Final top-1 (mean +- std over seeds) against sparsity, one line per method/model/config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for g in groups:
        config = " ".join(o for o in g["config"].split() if not o.startswith("sparsity="))
        label = f"{g['method']} {g['model']}" + (f" ({config})" if config else "")
        lines[label].append(g)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in lines.items():
        points = sorted(points, key=lambda g: float(g["sparsity"]))
        xs = [float(p["sparsity"]) for p in points]
        ax.errorbar(
            xs,
            [p["val_top1_final"] for p in points],
            yerr=[p["val_top1_final_std"] for p in points],
            marker="o",
            capsize=3,
            label=label,
        )
    ax.set_xlabel("sparsity")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("Accuracy vs sparsity")
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def collect(root: str, out_dir: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """Write ``results.md``, ``results.csv`` and ``accuracy_vs_sparsity.png``; return the rows and Markdown."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no such directory: {root}")
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no run directories (with summary.json or .hydra/) under {root}")
    rows = [read_run(r, root) for r in runs]
    out_dir = out_dir or root
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    groups = aggregate(rows)
    text = f"# Results: {display_root(root)}\n\n## Jobs\n\n{markdown_table(rows, COLUMNS)}\n"
    if groups:
        text += f"\n## Mean +- std over seeds\n\n{aggregate_markdown(groups)}\n"
        plot(groups, os.path.join(out_dir, "accuracy_vs_sparsity.png"))
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    return rows, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="a sweep directory (multirun/<date>/<time>) or any folder of run dirs")
    parser.add_argument("--out", default=None, help="where to write results.{md,csv} and the plot")
    args = parser.parse_args(argv)
    try:
        _, text = collect(args.root, args.out)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
