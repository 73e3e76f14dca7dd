"""Turn sweep directories into the paper's tables (Markdown + CSV) and figures (PNG).

Every run directory under the given paths that holds a ``summary.json`` is one run; its ``.hydra/config.yaml``
gives the fold (``data.fold``) and its ``metrics.jsonl`` the per-epoch validation accuracy. Runs are grouped into
one table per (model, dataset): rows = methods, columns = sparsities, cells = top-1 mean +- std over seeds and
folds (``n`` runs). Dense does not depend on the sparsity, so its runs are pooled into one row.

    python scripts/make_tables.py multirun/digits_study/* --out docs/results/digits_study
    python scripts/make_tables.py multirun/<date>/<time> --out docs/results/speedup \
        --bench docs/benchmarks/cpu/bench_kernels.json

Writes to ``--out``: ``runs.csv`` (one row per run), ``tables.md`` (accuracy, paired differences, throughput),
``accuracy.csv``, ``paired.csv``, ``throughput.csv``, ``accuracy.png``, ``throughput.png``, ``paired.png``
(differences with CIs), ``curves.png`` (validation top-1 per epoch), for methods that select diagonals
``selection.csv`` (freeze drop, top-K share at the freeze), ``selection_history.csv`` and ``selection.png`` (top-K
share and live diagonals / K per epoch) and, with ``--bench``,
``layer_speedup.png`` (kernel speedup vs sparsity per ViT-B layer shape from ``scripts/bench_kernels.py``).

Paired differences: for every method and sparsity, ``reference - method`` (default reference ``dynadiag``) over the
(seed, fold) pairs both have (dense pairs at any sparsity), with a 95 % t confidence interval and the two-sided
paired t-test p-value. The comparisons of one table and metric form one family: their p-values are Holm-adjusted
(``holm``), and a difference is called real only when its adjusted p is below 0.05 and there are at least 3 pairs.
The CIs are per comparison (unadjusted). Pairing on (seed, fold) removes the variation between folds and seeds that
both methods share; it does not make the pairs independent (cross-validation folds share most of their training
images and every seed reuses the same folds), so the t intervals are somewhat too narrow and the p-values somewhat
too small: read a verdict as "this split and these seeds", not as a claim about new data.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

METRICS = {"final": "val_top1_final", "best": "val_top1_best", "last5": "val_top1_last5"}
#: fewer pairs than this give no verdict (with 2 pairs a t interval hinges on one difference of differences)
MIN_PAIRS = 3
METHOD_ORDER = ("dense", "dynadiag", "sparse_dynadiag", "diag_heur", "rigl", "srigl", "set", "gmp", "static")


def _fold(run_dir: Path) -> int | None:
    cfg_path = run_dir / ".hydra" / "config.yaml"
    if not cfg_path.is_file():
        return None
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    data = cfg.get("data") or {}
    return int(data["fold"]) if data.get("num_folds") and data.get("fold") is not None else None


def _val_history(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    history = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "val/top1" in record:
                history.append(float(record["val/top1"]))
    return history


#: per-evaluation selection quantities (dynadiag/selection_stats.py) that ``selection.png`` plots over training
SELECTION_KEYS = ("topk_share", "live_over_k", "churn")


def _selection_history(run_dir: Path) -> list[dict[str, float]]:
    """``{"epoch", "topk_share", "live_over_k", "churn"}`` per evaluation of a method that selects (else ``[]``)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    history = []
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if "val/top1" in record and f"selection/{SELECTION_KEYS[0]}" in record:
            point = {"epoch": float(record.get("epoch", len(history) + 1))}
            point |= {key: float(record.get(f"selection/{key}", math.nan)) for key in SELECTION_KEYS}
            history.append(point)
    return history


_CSV_NUMBERS = {
    "sparsity": float,
    "seed": int,
    "fold": int,
    "val_top1_final": float,
    "val_top1_best": float,
    "val_top1_last5": float,
    "sparsity_effective": float,
    "train_images_per_s": float,
    "train_images_per_s_overall": float,
    "train_images_per_cpu_s_overall": float,
    "freeze_drop": float,
    "topk_share_at_freeze": float,
    "infer_images_per_s": float,
    "wall_time_s": float,
}


def _run_key(row: dict[str, Any]) -> tuple:
    fold = row.get("fold")
    fold = None if fold in (None, "") else int(fold)
    return (row["model"], row["data"], row["method"], float(row["sparsity"]), int(row["seed"]), fold)


def load_runs_csv(path: Path) -> list[dict[str, Any]]:
    """Runs from a ``runs.csv`` this script wrote earlier (the run directories may be gone; no top-1 curve).

    The selection curves come back from a ``selection_history.csv`` beside it, if there is one.
    """
    histories: dict[tuple, list[dict[str, float]]] = defaultdict(list)
    history_path = path.with_name("selection_history.csv")
    if history_path.is_file():
        with history_path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                point = {
                    k: float(row[k]) if row.get(k) not in (None, "") else math.nan for k in ("epoch", *SELECTION_KEYS)
                }
                histories[_run_key(row)].append(point)
    runs = []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            run: dict[str, Any] = dict(row)
            for key, kind in _CSV_NUMBERS.items():
                run[key] = kind(row[key]) if row.get(key) not in (None, "") else None
            run["history"], run["selection_history"] = [], histories.get(_run_key(run), [])
            runs.append(run)
    return runs


def relative_run_dir(run_dir: Path, root: Path) -> str:
    """``run_dir`` relative to its output root, as results files store it (never an absolute path of the machine).

    The output root is Hydra's ``multirun/`` or ``outputs/`` folder when the path has one (the last such part), else
    the folder holding ``root``, the sweep or run directory given on the command line.
    """
    parts = run_dir.parts
    for anchor in ("multirun", "outputs"):
        if anchor in parts:
            return Path(*parts[len(parts) - 1 - parts[::-1].index(anchor) :]).as_posix()
    return run_dir.resolve().relative_to(root.resolve().parent).as_posix()


def load_runs(paths: Iterable[str | Path], last: int = 5) -> list[dict[str, Any]]:
    """One dict per finished run found under ``paths``.

    A path is a sweep or run directory (every ``summary.json`` below it is a run) or a ``runs.csv`` written by this
    script, so committed results can be combined with new sweeps without re-running them. ``run_dir`` is stored
    relative to the output root (``relative_run_dir``); ``path`` is where the run lies on this machine (not written).
    """
    runs = []
    for root in paths:
        if Path(root).suffix == ".csv":
            runs += load_runs_csv(Path(root))
            continue
        for summary_path in sorted(Path(root).rglob("summary.json")):
            run_dir = summary_path.parent
            s = json.loads(summary_path.read_text())
            history = _val_history(run_dir)
            runs.append(
                {
                    "run_dir": relative_run_dir(run_dir, Path(root)),
                    "path": run_dir,
                    "model": s.get("model"),
                    "data": s.get("data"),
                    "method": s.get("method"),
                    "sparsity": 0.0 if s.get("method") == "dense" else float(s.get("sparsity", 0.0)),
                    "seed": int(s.get("seed", 0)),
                    "fold": _fold(run_dir),
                    "val_top1_final": s.get("val_top1_final"),
                    "val_top1_best": s.get("val_top1_best"),
                    "val_top1_last5": statistics.fmean(history[-last:]) if history else s.get("val_top1_final"),
                    "sparsity_effective": s.get("sparsity_effective"),
                    "train_images_per_s": s.get("train_images_per_s"),
                    # whole run (soft phase included); train_images_per_s is the final topology only
                    "train_images_per_s_overall": s.get("train_images_per_s_overall"),
                    # images per second of process CPU time (CPU runs): robust to a loaded machine's descheduling
                    "train_images_per_cpu_s_overall": s.get("train_images_per_cpu_s_overall"),
                    "freeze_drop": s.get("freeze_drop"),
                    "topk_share_at_freeze": s.get("topk_share_at_freeze"),
                    "infer_images_per_s": s.get("infer_images_per_s"),
                    "wall_time_s": s.get("wall_time_s"),
                    "device": s.get("device"),
                    "history": history,  # val top-1 per evaluation (not written to runs.csv)
                    "selection_history": _selection_history(run_dir),  # -> selection_history.csv
                }
            )
    return runs


def _method_key(name: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER), name)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _t_quantile(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def paired_difference(a: dict[tuple, float], b: dict[tuple, float]) -> dict[str, float] | None:
    """``a - b`` over the keys both have: mean, std, n, 95 % t CI and the paired t-test p-value."""
    keys = sorted(set(a) & set(b))
    if not keys:
        return None
    diffs = [a[k] - b[k] for k in keys]
    mean, std = _mean_std(diffs)
    n = len(diffs)
    if n < 2:
        return {"mean": mean, "std": std, "n": n, "lo": math.nan, "hi": math.nan, "p": math.nan}
    half = _t_quantile(n - 1) * std / math.sqrt(n)
    if std == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
    else:
        from scipy.stats import t

        p = float(2 * t.sf(abs(mean / (std / math.sqrt(n))), n - 1))
    return {"mean": mean, "std": std, "n": n, "lo": mean - half, "hi": mean + half, "p": p}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given (NaN stays NaN and is not counted in the family).

    Sort the m valid p-values ascending; the i-th smallest (i from 0) becomes ``max_{j <= i} min(1, (m - j) p_(j))``.
    Calling a difference real when its adjusted p is below alpha keeps the chance of any false call among the m
    comparisons at or below alpha, whatever their dependence (Holm 1979).

    Args:
        pvalues: raw p-values of one family of comparisons, e.g. every paired test of one table.

    Returns:
        The adjusted p-values, same length and order.
    """
    valid = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(valid):
        running = max(running, min(1.0, (len(valid) - rank) * p))
        adjusted[i] = running
    return adjusted


def add_holm(rows: list[dict[str, Any]], min_pairs: int = 3) -> list[dict[str, Any]]:
    """Set ``p_holm`` on paired rows: Holm over the rows with at least ``min_pairs`` pairs (the others get NaN)."""
    family = [r["p"] if r["n"] >= min_pairs else math.nan for r in rows]
    for row, adjusted in zip(rows, holm(family), strict=True):
        row["p_holm"] = adjusted
    return rows


class Table:
    """The runs of one (model, dataset) pair, indexed by method and sparsity."""

    def __init__(self, runs: list[dict[str, Any]], metric: str) -> None:
        self.runs, self.metric = runs, METRICS[metric]
        self.methods = sorted({r["method"] for r in runs}, key=_method_key)
        self.sparsities = sorted({r["sparsity"] for r in runs if r["method"] != "dense"})

    def cell_runs(self, method: str, sparsity: float) -> list[dict[str, Any]]:
        if method == "dense":
            return [r for r in self.runs if r["method"] == "dense"]
        return [r for r in self.runs if r["method"] == method and r["sparsity"] == sparsity]

    def values(self, method: str, sparsity: float, key: str | None = None) -> dict[tuple, float]:
        """(seed, fold) -> metric; several dense runs with the same (seed, fold) are averaged."""
        grouped: dict[tuple, list[float]] = defaultdict(list)
        for r in self.cell_runs(method, sparsity):
            value = r[key or self.metric]
            if value is not None:
                grouped[(r["seed"], r["fold"])].append(float(value))
        return {k: statistics.fmean(v) for k, v in grouped.items()}


def _fmt(mean: float, std: float, n: int, digits: int = 2) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f} ({n})" if n > 1 else f"{mean:.{digits}f} (1)"


def accuracy_rows(table: Table) -> list[dict[str, Any]]:
    rows = []
    for method in table.methods:
        for s in table.sparsities or [0.0]:
            vals = list(table.values(method, s).values())
            if vals:
                mean, std = _mean_std(vals)
                rows.append({"method": method, "sparsity": s, "mean": mean, "std": std, "n": len(vals)})
    return rows


def paired_rows(table: Table, reference: str, key: str | None = None) -> list[dict[str, Any]]:
    rows = []
    if reference not in table.methods:
        return rows
    for s in table.sparsities:
        ref = table.values(reference, s, key)
        for method in table.methods:
            if method == reference:
                continue
            d = paired_difference(ref, table.values(method, s, key))
            if d is not None:
                rows.append({"reference": reference, "method": method, "sparsity": s, **d})
    return add_holm(rows, MIN_PAIRS)  # the family: every comparison of this table and metric


def throughput_rows(table: Table) -> list[dict[str, Any]]:
    rows = []
    for method in table.methods:
        for s in [0.0] if method == "dense" else table.sparsities:
            cell = table.cell_runs(method, s)
            train = [r["train_images_per_s"] for r in cell if r["train_images_per_s"]]
            infer = [r["infer_images_per_s"] for r in cell if r["infer_images_per_s"]]
            if train or infer:
                rows.append(
                    {
                        "method": method,
                        "sparsity": s,
                        "train_median": statistics.median(train) if train else math.nan,
                        "infer_median": statistics.median(infer) if infer else math.nan,
                        "train_vs_dense": _ratio_to_dense(table, cell, "train_images_per_s"),
                        "train_overall_vs_dense": _ratio_to_dense(table, cell, "train_images_per_s_overall"),
                        "train_overall_cpu_vs_dense": _ratio_to_dense(table, cell, "train_images_per_cpu_s_overall"),
                        "infer_vs_dense": _ratio_to_dense(table, cell, "infer_images_per_s"),
                        "n": len(cell),
                    }
                )
    return rows


def _ratio_to_dense(table: Table, cell: list[dict[str, Any]], key: str) -> float:
    """Median over (seed, fold) of ``run / dense run with the same (seed, fold)``: jobs of one seed and fold run
    back to back in a sweep, so the ratio cancels slow drifts of machine load that absolute numbers carry."""
    dense = {(r["seed"], r["fold"]): r.get(key) for r in table.cell_runs("dense", 0.0) if r.get(key)}
    ratios = [r[key] / dense[(r["seed"], r["fold"])] for r in cell if r.get(key) and (r["seed"], r["fold"]) in dense]
    return statistics.median(ratios) if ratios else math.nan


def markdown_accuracy(table: Table, rows: list[dict[str, Any]], digits: int = 2) -> str:
    cols = table.sparsities or [0.0]
    lines = ["| method | " + " | ".join(f"{100 * s:g} %" for s in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    by = {(r["method"], r["sparsity"]): r for r in rows}
    for method in table.methods:
        cells = []
        for s in cols:
            r = by.get((method, s))
            cells.append(_fmt(r["mean"], r["std"], r["n"], digits) if r else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_paired(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    ref = rows[0]["reference"]
    lines = [
        f"| sparsity | {ref} − method | mean diff (pp) | 95 % CI | paired t p | Holm p | n pairs | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ci = "" if math.isnan(r["lo"]) else f"[{r['lo']:+.2f}, {r['hi']:+.2f}]"
        p = "" if math.isnan(r["p"]) else f"{r['p']:.3f}"
        p_holm = "" if math.isnan(r.get("p_holm", math.nan)) else f"{r['p_holm']:.3f}"
        lines.append(
            f"| {100 * r['sparsity']:g} % | {r['method']} | {r['mean']:+.2f} | {ci} | {p} | {p_holm} | {r['n']} "
            f"| {verdict(r)} |"
        )
    return "\n".join(lines)


def verdict(row: dict[str, Any], alpha: float = 0.05) -> str:
    """The call a paired row supports: a winner only when the Holm-adjusted p is below ``alpha``.

    A difference whose unadjusted CI excludes 0 but whose adjusted p does not pass is reported as
    ``"<winner> better (unadjusted only)"``: suggestive, not a finding of the table.
    """
    if row["n"] < MIN_PAIRS or math.isnan(row["lo"]):
        return "too few pairs"
    winner = row["reference"] if row["mean"] > 0 else row["method"]
    if row.get("p_holm", math.nan) < alpha:
        return f"{winner} better"
    if row["lo"] > 0 or row["hi"] < 0:
        return f"{winner} better (unadjusted only)"
    return "within noise"


def selection_rows(table: Table) -> list[dict[str, Any]]:
    """Freeze drop (top-1 just before minus just after the freeze) and top-K share at the freeze, per cell."""
    rows = []
    for method in table.methods:
        for s in table.sparsities:
            cell = [r for r in table.cell_runs(method, s) if r.get("freeze_drop") is not None]
            if cell:
                drop = _mean_std([float(r["freeze_drop"]) for r in cell])
                shares = [float(r["topk_share_at_freeze"]) for r in cell if r.get("topk_share_at_freeze") is not None]
                share = _mean_std(shares) if shares else (math.nan, math.nan)
                rows.append(
                    {
                        "method": method,
                        "sparsity": s,
                        "freeze_drop_mean": drop[0],
                        "freeze_drop_std": drop[1],
                        "topk_share_mean": share[0],
                        "topk_share_std": share[1],
                        "n": len(cell),
                    }
                )
    return rows


def markdown_selection(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | sparsity | freeze drop (pp) | top-K share at the freeze | runs |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {100 * r['sparsity']:g} % | {r['freeze_drop_mean']:+.2f} ± {r['freeze_drop_std']:.2f} "
            f"| {r['topk_share_mean']:.3f} ± {r['topk_share_std']:.3f} | {r['n']} |"
        )
    return "\n".join(lines)


def markdown_throughput(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | sparsity | train img/s (median) | inference img/s (median) | train / dense "
        "| whole-run train / dense | whole-run train / dense (CPU time) | inference / dense | runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = "–" if r["method"] == "dense" else f"{100 * r['sparsity']:g} %"
        lines.append(
            f"| {r['method']} | {s} | {r['train_median']:,.0f} | {r['infer_median']:,.0f} | "
            f"{r['train_vs_dense']:.2f} | {r['train_overall_vs_dense']:.2f} | {r['train_overall_cpu_vs_dense']:.2f} | "
            f"{r['infer_vs_dense']:.2f} | {r['n']} |"
        )
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
    rows = [{**(extra or {}), **r} for r in rows]
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _save(fig: Any, path: Path) -> dict[str, list[str]]:
    """Lay out, write (PNG, 120 dpi) and close a matplotlib figure.

    Returns:
        What was drawn: ``{"<panel title> | <y label>": [labels of its lines and error bars]}`` (what a reader sees
        in each legend).
    """
    import matplotlib.pyplot as plt

    drawn = {f"{ax.get_title()} | {ax.get_ylabel()}": ax.get_legend_handles_labels()[1] for ax in fig.axes}
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def plot_accuracy(
    tables: dict[tuple, Table], rows: dict[tuple, list[dict]], path: Path, metric: str
) -> dict[str, list[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.5), squeeze=False)
    for ax, (key, table) in zip(axes[0], tables.items()):
        for method in table.methods:
            pts = sorted((r["sparsity"], r["mean"], r["std"]) for r in rows[key] if r["method"] == method)
            if method == "dense":
                mean, std = pts[0][1], pts[0][2]
                ax.axhspan(mean - std, mean + std, color="gray", alpha=0.2)
                ax.axhline(mean, color="gray", lw=1, label="dense (± std)")
                continue
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
        ax.set_xlabel("sparsity")
        ax.set_ylabel(f"top-1 % ({metric})")
        ax.set_title(f"{key[0]} on {key[1]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_throughput(tables: dict[tuple, Table], rows: dict[tuple, list[dict]], path: Path) -> dict[str, list[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tables), 2, figsize=(11, 4 * len(tables)), squeeze=False)
    for row_axes, (key, table) in zip(axes, tables.items()):
        for ax, field, title in zip(row_axes, ("train_median", "infer_median"), ("training", "inference")):
            for method in table.methods:
                pts = sorted((r["sparsity"], r[field]) for r in rows[key] if r["method"] == method)
                if method == "dense":
                    ax.axhline(pts[0][1], color="gray", lw=1, label="dense")
                    continue
                ax.plot(*zip(*pts), marker="o", label=method)
            ax.set_xlabel("sparsity")
            ax.set_ylabel("images/s (median over runs)")
            ax.set_title(f"{title}: {key[0]} on {key[1]}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return _save(fig, path)


def plot_paired(tables: dict[tuple, Table], reference: str, key: str, path: Path) -> dict[str, list[str]]:
    """``reference - method`` per sparsity with 95 % CIs; bars crossing 0 are within noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.5), squeeze=False)
    for ax, (tkey, table) in zip(axes[0], tables.items()):
        rows = [r for r in paired_rows(table, reference, key) if r["n"] >= MIN_PAIRS]
        others = [m for m in table.methods if m != reference]
        for i, method in enumerate(others):
            pts = sorted((r["sparsity"], r["mean"], r["lo"], r["hi"]) for r in rows if r["method"] == method)
            if not pts:
                continue
            xs, ys, lo, hi = zip(*pts)
            shift = 0.004 * (i - (len(others) - 1) / 2)  # side by side at each sparsity
            err = [[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]]
            ax.errorbar([x + shift for x in xs], ys, yerr=err, marker="o", capsize=3, ls="none", label=method)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xlabel("sparsity")
        ax.set_ylabel(f"{reference} − method, top-1 pp (95 % CI)")
        ax.set_title(f"paired differences: {tkey[0]} on {tkey[1]}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"fewer than {MIN_PAIRS} pairs", transform=ax.transAxes, ha="center")
    return _save(fig, path)


def plot_curves(tables: dict[tuple, Table], path: Path) -> dict[str, list[str]]:
    """Mean validation top-1 per evaluation, per method, at each table's most-run sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.5), squeeze=False)
    for ax, (key, table) in zip(axes[0], tables.items()):
        counts = {s: len([r for r in table.runs if r["sparsity"] == s]) for s in table.sparsities}
        s = max(counts, key=counts.get) if counts else 0.0
        for method in table.methods:
            histories = [r["history"] for r in table.cell_runs(method, s) if r["history"]]
            if not histories:
                continue
            length = min(len(h) for h in histories)
            mean = [statistics.fmean(h[i] for h in histories) for i in range(length)]
            ax.plot(range(1, length + 1), mean, label=f"{method} (n={len(histories)})")
        ax.set_xlabel("evaluation (epoch)")
        ax.set_ylabel("val top-1 % (mean over runs)")
        ax.set_title(f"{key[0]} on {key[1]}, sparsity {s:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def selection_history_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Long-format rows (one per run and evaluation) of the selection quantities, for ``selection_history.csv``."""
    rows = []
    for r in runs:
        for point in r.get("selection_history") or []:
            rows.append({k: r[k] for k in ("model", "data", "method", "sparsity", "seed", "fold")} | point)
    return rows


def plot_selection(tables: dict[tuple, Table], path: Path) -> dict[str, list[str]]:
    """Top-K share and live diagonals / K per evaluation (mean over runs), per selecting method and sparsity.

    One row of panels per (model, dataset) that has runs with selection metrics; draws nothing and returns ``{}``
    when none has.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keyed = {key: t for key, t in tables.items() if any(r.get("selection_history") for r in t.runs)}
    if not keyed:
        return {}
    fig, axes = plt.subplots(len(keyed), 2, figsize=(12, 4.2 * len(keyed)), squeeze=False)
    for (ax_share, ax_live), (key, table) in zip(axes, keyed.items()):
        for method in table.methods:
            for s in table.sparsities:
                histories = [r["selection_history"] for r in table.cell_runs(method, s) if r.get("selection_history")]
                if not histories:
                    continue
                length = min(len(h) for h in histories)
                epochs = [histories[0][i]["epoch"] for i in range(length)]
                label = f"{method} {100 * s:g} % (n={len(histories)})"
                for ax, name in ((ax_share, "topk_share"), (ax_live, "live_over_k")):
                    mean = [statistics.fmean(h[i][name] for h in histories) for i in range(length)]
                    ax.plot(epochs, mean, label=label)
        ax_share.set_ylabel("top-K share (mass of the K largest soft weights)")
        ax_share.axhline(0.9, color="gray", lw=0.8, ls="--")
        ax_live.set_ylabel("live diagonals / K (exp entropy)")
        ax_live.set_yscale("log")
        for ax in (ax_share, ax_live):
            ax.set_xlabel("epoch")
            ax.set_title(f"{key[0]} on {key[1]}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_layer_speedup(bench_json: Path, path: Path) -> dict[str, list[str]]:
    """Kernel speedup vs dense (fwd and fwd+bwd) vs sparsity, one line per layer shape and backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(bench_json.read_text())
    records = [r for r in data["records"] if "fwd_vs_dense" in r and r["method"].endswith("fp32")]
    # A run may time several thread counts (records carry "threads"): plot the largest one.
    most = max((r.get("threads") or 0 for r in records), default=0)
    records = [r for r in records if (r.get("threads") or 0) == most]
    tokens = sorted({r["tokens"] for r in records})
    fig, axes = plt.subplots(2, len(tokens), figsize=(6 * len(tokens), 8), squeeze=False)
    for col, n in enumerate(tokens):
        for row, phase in enumerate(("fwd", "fb")):
            ax = axes[row][col]
            for method in sorted({r["method"] for r in records}):
                for shape in sorted({(r["in"], r["out"]) for r in records}):
                    pts = sorted(
                        (r["achieved_sparsity"], r[f"{phase}_vs_dense"])
                        for r in records
                        if r["method"] == method and r["tokens"] == n and (r["in"], r["out"]) == shape
                    )
                    if pts:
                        ax.plot(*zip(*pts), marker="o", ms=3, label=f"{method} {shape[0]}->{shape[1]}")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_yscale("log")
            ax.set_xlabel("sparsity")
            ax.set_ylabel(f"{phase} speedup vs dense fp32")
            ax.set_title(f"{phase}, {n} tokens ({data['meta'].get('device_name') or data['meta'].get('device')})")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2)
    return _save(fig, path)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, list[str]]]:
    """Write the tables and figures; returns what each figure shows (``{file: {panel title: [series]}}``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "paths", nargs="+", help="sweep or run directories (searched for summary.json) or runs.csv files"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--metric", default="final", choices=list(METRICS), help="top-1 of the tables")
    parser.add_argument("--reference", default="dynadiag", help="method the paired differences start from")
    parser.add_argument("--last", type=int, default=5, help="evaluations averaged by the last5 metric")
    parser.add_argument("--bench", type=Path, default=None, help="bench_kernels.json for the layer-speedup plot")
    args = parser.parse_args(argv)

    runs = load_runs(args.paths, last=args.last)
    if not runs:
        raise SystemExit(f"no summary.json under {args.paths}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("runs.csv", "accuracy.csv", "paired.csv", "throughput.csv", "selection.csv", "selection_history.csv"):
        (args.out / name).unlink(missing_ok=True)
    written = [{k: v for k, v in r.items() if not k.endswith("history") and k != "path"} for r in runs]
    write_csv(args.out / "runs.csv", written)
    if selection_history := selection_history_rows(runs):
        write_csv(args.out / "selection_history.csv", selection_history)

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["model"], r["data"])].append(r)
    tables = {key: Table(group, args.metric) for key, group in sorted(groups.items())}
    acc, thr = {}, {}
    md = [f"<!-- generated by scripts/make_tables.py from {len(runs)} runs; metric: {args.metric} -->"]
    for key, table in tables.items():
        extra = {"model": key[0], "data": key[1]}
        acc[key], thr[key] = accuracy_rows(table), throughput_rows(table)
        md += [f"## {key[0]} on {key[1]}", "", f"Top-1 % ({args.metric}), mean ± std (runs):", ""]
        md += [markdown_accuracy(table, acc[key]), ""]
        for metric in dict.fromkeys((args.metric, "last5")):
            paired = paired_rows(table, args.reference, METRICS[metric])
            if paired:
                md += [f"Paired differences, top-1 {metric} (per seed and fold):", "", markdown_paired(paired), ""]
                write_csv(args.out / "paired.csv", paired, {**extra, "metric": metric})
        md += [
            "Throughput (measured by the trainer; '/ dense': median ratio to the dense run of the same seed and fold):"
        ]
        md += ["", markdown_throughput(thr[key]), ""]
        selection = selection_rows(table)
        if selection:
            md += ["Selection at the freeze (methods with a freeze; top-1 just before minus just after it):", ""]
            md += [markdown_selection(selection), ""]
            write_csv(args.out / "selection.csv", selection, extra)
        write_csv(args.out / "accuracy.csv", acc[key], {**extra, "metric": args.metric})
        write_csv(args.out / "throughput.csv", thr[key], extra)
    (args.out / "tables.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    drawn = {
        "accuracy.png": plot_accuracy(tables, acc, args.out / "accuracy.png", args.metric),
        "throughput.png": plot_throughput(tables, thr, args.out / "throughput.png"),
        "paired.png": plot_paired(tables, args.reference, METRICS[args.metric], args.out / "paired.png"),
        "curves.png": plot_curves(tables, args.out / "curves.png"),
    }
    (args.out / "selection.png").unlink(missing_ok=True)
    drawn["selection.png"] = plot_selection(tables, args.out / "selection.png")
    if args.bench:
        drawn["layer_speedup.png"] = plot_layer_speedup(args.bench, args.out / "layer_speedup.png")
    print("\n".join(md))
    print(f"wrote {args.out}/tables.md, *.csv and *.png from {len(runs)} runs")
    return drawn


if __name__ == "__main__":
    main()
