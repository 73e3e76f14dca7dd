"""Accuracy vs group size on the digits study: grouped DynaDiag runs against free diagonals (g = 1) and RigL.

Reads run directories (``summary.json`` + ``.hydra/config.yaml``) and/or ``runs.csv`` files written by
``scripts/make_tables.py`` (for committed baselines whose directories are gone). A ``dynadiag`` run is labelled by
its ``sparsifier.config.group`` and ``sparsifier.config.permute`` (``sparsifier.group``/``permute`` in older runs):
``g8``, ``g8+perm``; runs without those keys are ``g1``; other methods keep their name.
Per sparsity it reports top-1 (final and mean of the last 5 evaluations) mean +- std, the
achieved sparsity of the sparsified layers, and paired differences ``label - g1`` and ``label - rigl`` over the
(seed, fold) pairs both have, with 95 % t confidence intervals (``make_tables.paired_difference``).

    python scripts/grouped_study.py multirun/grouped docs/results/digits_study_40ep/runs.csv --out docs/results/grouped
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tables import _mean_std, load_runs, paired_difference

REFERENCES = ("g1", "rigl")


def _label(run: dict[str, Any]) -> str:
    if run["method"] != "dynadiag":
        return str(run["method"])
    cfg_path = Path(str(run.get("path") or run.get("run_dir", ""))) / ".hydra" / "config.yaml"
    sparsifier = {}
    if cfg_path.is_file():
        sparsifier = (yaml.safe_load(cfg_path.read_text()) or {}).get("sparsifier") or {}
    sparsifier = sparsifier.get("config") or sparsifier  # runs since a338677 nest it in DiagSparsifyConfig
    group = int(sparsifier.get("group", 1) or 1)
    return f"g{group}" + ("+perm" if sparsifier.get("permute") else "")


def _order(label: str) -> tuple:
    if label.startswith("g"):
        return (0, int(label[1:].split("+")[0]), label)
    return (1, 0, label)


def analyse(runs: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    cells: dict[tuple[float, str], dict[tuple, dict]] = defaultdict(dict)
    for run in runs:
        if run.get(metric) is None or run["method"] == "dense":
            continue
        cells[(float(run["sparsity"]), run["label"])][(run["seed"], run["fold"])] = run
    rows = []
    for sparsity, label in sorted(cells, key=lambda k: (k[0], _order(k[1]))):
        cell = cells[(sparsity, label)]
        values = {k: float(r[metric]) for k, r in cell.items()}
        mean, std = _mean_std(list(values.values()))
        eff = [float(r["sparsity_effective"]) for r in cell.values() if r.get("sparsity_effective") is not None]
        row = {"sparsity": sparsity, "label": label, "n": len(values), "mean": mean, "std": std}
        row["sparsity_effective"] = sum(eff) / len(eff) if eff else None
        for ref in REFERENCES:
            other = cells.get((sparsity, ref))
            diff = None
            if other is not None and ref != label:
                diff = paired_difference(values, {k: float(r[metric]) for k, r in other.items()})
            row[f"vs_{ref}"] = diff
        rows.append(row)
    return rows


def _fmt_diff(d: dict | None) -> str:
    if d is None:
        return ""
    if d["n"] < 2:
        return f"{d['mean']:+.2f} (n={d['n']})"
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] (n={d['n']})"


def markdown(rows: list[dict[str, Any]], metric: str) -> str:
    lines = [
        f"Top-1 `{metric}` (%), mean +- std over (seed, fold) runs; paired differences with 95 % t CIs.",
        "",
        "| sparsity | run | n | top-1 | achieved sparsity | - g1 (free diagonals) | - RigL |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eff = "" if r["sparsity_effective"] is None else f"{r['sparsity_effective']:.3f}"
        lines.append(
            f"| {r['sparsity']:.3f} | {r['label']} | {r['n']} | {r['mean']:.2f} +- {r['std']:.2f} | {eff} | "
            f"{_fmt_diff(r['vs_g1'])} | {_fmt_diff(r['vs_rigl'])} |"
        )
    return "\n".join(lines) + "\n"


def extra_pairs(runs: list[dict[str, Any]], metric: str, pairs: list[str]) -> str:
    """Paired differences between arbitrary cells, ``"g8@0.9:g1@0.875"`` = (g8 at 90 %) - (g1 at 87.5 %)."""
    if not pairs:
        return ""
    cells: dict[tuple[str, float], dict[tuple, float]] = defaultdict(dict)
    for run in runs:
        if run.get(metric) is not None:
            cells[(run["label"], round(float(run["sparsity"]), 4))][(run["seed"], run["fold"])] = float(run[metric])
    lines = ["| comparison | difference [95 % CI] | p |", "|---|---|---|"]
    for pair in pairs:
        (a, sa), (b, sb) = (item.split("@") for item in pair.split(":"))
        d = paired_difference(cells.get((a, round(float(sa), 4)), {}), cells.get((b, round(float(sb), 4)), {}))
        p = "" if d is None or d["n"] < 2 else f"{d['p']:.3f}"
        lines.append(f"| {a} at {float(sa):.3f} - {b} at {float(sb):.3f} | {_fmt_diff(d)} | {p} |")
    return "\nDensity-matched and other pairs (same (seed, fold)):\n\n" + "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sparsities = sorted({r["sparsity"] for r in rows if r["vs_g1"] is not None and r["vs_g1"]["n"] >= 2})
    if not sparsities:  # no paired g = 1 rows (e.g. the default model has no paper-DynaDiag runs): nothing to plot
        return
    fig, axes = plt.subplots(1, len(sparsities), figsize=(5.5 * len(sparsities), 3.8), squeeze=False)
    for ax, s in zip(axes[0], sparsities, strict=True):
        rs = [r for r in rows if r["sparsity"] == s and r["vs_g1"] is not None and r["vs_g1"]["n"] >= 2]
        for i, r in enumerate(rs):
            d = r["vs_g1"]
            ax.errorbar(d["mean"], i, xerr=[[d["mean"] - d["lo"]], [d["hi"] - d["mean"]]], fmt="o", capsize=3)
        ax.axvline(0.0, color="k", lw=0.8)
        ax.set_yticks(range(len(rs)), [f"{r['label']} (n={r['vs_g1']['n']})" for r in rs])
        ax.set_xlabel("top-1 difference vs g = 1 (points), 95 % CI")
        ax.set_title(f"sparsity {s:.0%}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="sweep/run directories and runs.csv files")
    parser.add_argument("--out", type=Path, default=Path("docs/results/grouped"))
    parser.add_argument("--model", default="vit_nano")
    parser.add_argument("--pairs", nargs="*", default=[], help='extra paired differences, e.g. "g8@0.9:g1@0.875"')
    args = parser.parse_args()
    runs = [r for r in load_runs(args.paths) if r.get("model") == args.model]
    for run in runs:
        run["label"] = _label(run)
    args.out.mkdir(parents=True, exist_ok=True)
    keys = ["label", "method", "sparsity", "seed", "fold", "val_top1_final", "val_top1_last5", "sparsity_effective"]
    with (args.out / "study_runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*keys, "run_dir"])
        writer.writeheader()
        for run in sorted(runs, key=lambda r: (r["sparsity"], _order(r["label"]), r["seed"], r["fold"])):
            writer.writerow({k: run.get(k) for k in [*keys, "run_dir"]})
    text = []
    result = {}
    for metric in ("val_top1_final", "val_top1_last5"):
        rows = analyse(runs, metric)
        result[metric] = rows
        text.append(f"### {metric}\n\n" + markdown(rows, metric) + extra_pairs(runs, metric, args.pairs))
    (args.out / "study.md").write_text("\n".join(text))
    (args.out / "study.json").write_text(json.dumps(result, indent=1))
    plot(result["val_top1_final"], args.out / "study.png")
    print("\n".join(text))


if __name__ == "__main__":
    main()
