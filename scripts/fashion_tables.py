"""Tables and the plot of the Fashion-MNIST study from its ``runs.csv`` (written by ``scripts/run_study.py``).

- Accuracy per cell: validation (the split every choice was made on) and test top-1 (the reported number), mean
  +- std over seeds, achieved sparsity of the sparsified layers.
- Paired differences against ``sparse_dynadiag`` (free diagonals, same target sparsity) on the test split, per seed,
  with 95 % t confidence intervals and the paired t-test p-value; each table (one per target sparsity) is one
  family whose p-values are Holm-adjusted (``make_tables.add_holm``: comparisons with at least 3 pairs).
- Whole-run training images per CPU-second (soft phase, freeze and all; 1 thread) and the ratio to dense.

The tables replace the block between ``<!-- tables:begin -->`` and ``<!-- tables:end -->`` of the page;
the plot is written next to the CSV. A compact summary (test top-1 per method and target, the paired difference
against ``sparse_dynadiag`` with its CI, the training speed against dense) replaces the block between
``<!-- fashion:begin -->`` and ``<!-- fashion:end -->`` of the README (``--readme ''`` skips it).

    python scripts/fashion_tables.py                      # docs/results/fashion_mnist/runs.csv -> the page, README
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import statistics
import sys
import textwrap
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tables import MIN_PAIRS, add_holm, paired_difference

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CSV = ROOT / "docs" / "results" / "fashion_mnist" / "runs.csv"
DEFAULT_PAGE = ROOT / "docs" / "results" / "fashion_mnist.md"
DEFAULT_README = ROOT / "README.md"
REFERENCE = "sparse_dynadiag"
ORDER = (
    "dense",
    "sparse_dynadiag",
    "sparse_dynadiag_ceil",
    "dynadiag",
    "diag_heur",
    "rigl",
    "sparsimony_rigl",
    "srigl",
    "srigl_dt25",
    "set",
    "static",
)
BEGIN, END = "<!-- tables:begin -->", "<!-- tables:end -->"
README_BEGIN, README_END = "<!-- fashion:begin -->", "<!-- fashion:end -->"

Cell = tuple[str, float, int, bool]  # method, sparsity, group, permute


def load(path: Path) -> dict[Cell, dict[int, dict[str, Any]]]:
    """cell -> seed -> row (numbers as floats); a later row of the same cell and seed replaces an earlier one."""
    cells: dict[Cell, dict[int, dict[str, Any]]] = defaultdict(dict)
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            cell = (row["method"], float(row["sparsity"]), int(row["group"] or 1), row["permute"] == "True")
            numbers = {}
            for key, value in row.items():
                try:
                    numbers[key] = float(value)
                except (TypeError, ValueError):
                    numbers[key] = value
            cells[cell][int(row["seed"])] = numbers
    return cells


def label(cell: Cell) -> str:
    method, _, group, permute = cell
    return method + (f" g={group}" + (" +perm" if permute else "") if group > 1 else "")


def _order(cell: Cell) -> tuple:
    method, sparsity, group, _ = cell
    return (sparsity, ORDER.index(method) if method in ORDER else len(ORDER), method, group)


def _stats(runs: dict[int, dict[str, Any]], key: str) -> tuple[float, float, int]:
    values = [r[key] for r in runs.values() if isinstance(r.get(key), float)]
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def _fmt(mean: float, std: float, n: int, digits: int = 2) -> str:
    if n == 0:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _dense_speed(cells: dict[Cell, dict[int, dict]]) -> float:
    """Dense's mean whole-run training images per CPU-second (NaN without a dense cell)."""
    return _stats(cells.get(("dense", 0.0, 1, False), {}), "train_images_per_cpu_s_overall")[0]


def _mask_unseen(cell: Cell, runs: dict[int, dict[str, Any]]) -> bool:
    """A sparse method whose masks the per-layer count cannot read (it masks through its own parametrization)."""
    return cell[0] != "dense" and _stats(runs, "sparsity_effective")[0] == 0


def accuracy_table(cells: dict[Cell, dict[int, dict]]) -> list[str]:
    dense = _dense_speed(cells)
    lines = [
        "| target | method | seeds | val top-1 | **test top-1** | sparsity (achieved) | train img / CPU-s | vs dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in sorted(cells, key=_order):
        runs = cells[cell]
        val, test = _stats(runs, "val_top1"), _stats(runs, "test_top1")
        speed = _stats(runs, "train_images_per_cpu_s_overall")
        achieved = _stats(runs, "sparsity_effective")[0]
        ratio = f"{speed[0] / dense:.2f}x" if dense == dense and speed[2] else "–"
        target = "–" if cell[0] == "dense" else f"{cell[1]:.0%}"
        mark = " \\*" if any(r.get("resumed") == "True" for r in runs.values()) else ""
        shown = "– †" if _mask_unseen(cell, runs) else f"{achieved:.3f}"
        lines.append(
            f"| {target} | {label(cell)}{mark} | {len(runs)} | {_fmt(*val)} | **{_fmt(*test)}** | "
            f"{shown} | {_fmt(*speed, digits=0)} | {ratio} |"
        )
    return lines


def paired_rows(cells: dict[Cell, dict[int, dict]], sparsity: float, key: str = "test_top1") -> list[dict[str, Any]]:
    """Each cell of this target sparsity (and dense) minus ``sparse_dynadiag`` at it, paired by seed; Holm over the
    rows with at least ``MIN_PAIRS`` pairs."""
    reference = cells.get((REFERENCE, sparsity, 1, False))
    if not reference:
        return []
    ref_values = {s: r[key] for s, r in reference.items() if isinstance(r.get(key), float)}
    rows = []
    for cell in sorted(cells, key=_order):
        if cell == (REFERENCE, sparsity, 1, False) or (cell[1] != sparsity and cell[0] != "dense"):
            continue
        values = {s: r[key] for s, r in cells[cell].items() if isinstance(r.get(key), float)}
        diff = paired_difference(values, ref_values)
        if diff is not None:
            rows.append({"cell": cell, **diff})
    return add_holm(rows, MIN_PAIRS)  # the family: every comparison of this table


def paired_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"| method | pairs | test top-1 − {REFERENCE} (pp) | 95 % CI | p | p (Holm) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ci = f"[{r['lo']:+.2f}, {r['hi']:+.2f}]" if r["n"] > 1 else "– (1 pair)"
        p = "–" if math.isnan(r["p"]) else f"{r['p']:.3f}"
        ph = "–" if math.isnan(r["p_holm"]) else f"{r['p_holm']:.3f}"
        lines.append(f"| {label(r['cell'])} | {r['n']} | {r['mean']:+.2f} | {ci} | {p} | {ph} |")
    return lines


def plot(cells: dict[Cell, dict[int, dict]], path: Path) -> None:
    """Test top-1 (mean and seeds) against whole-run training images per CPU-second, one point per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    markers = {0.0: "*", 0.9: "o", 0.98: "s"}
    # one colour per method (and group variant), one marker per target sparsity
    names = sorted({label(c) for c in cells}, key=lambda n: min(_order(c) for c in cells if label(c) == n)[1:])
    colours = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}
    for cell in sorted(cells, key=_order):
        runs = cells[cell]
        test, speed = _stats(runs, "test_top1"), _stats(runs, "train_images_per_cpu_s_overall")
        if not test[2] or not speed[2]:
            continue
        ax.errorbar(
            speed[0],
            test[0],
            yerr=test[1] if test[2] > 1 else None,
            marker=markers.get(cell[1], "^"),
            color=colours[label(cell)],
            markersize=7,
            capsize=3,
            linestyle="none",
            label=f"{label(cell)} {'' if cell[0] == 'dense' else f'{cell[1]:.0%}'}",
        )
    ax.set_xlabel("training images per CPU-second (whole run, 1 thread)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Fashion-MNIST, ViT patch 7 / width 64 / depth 4 (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="o 90 %   s 98 %", title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(cells: dict[Cell, dict[int, dict]], csv_link: str, plot_link: str) -> str:
    seeds = sorted({s for runs in cells.values() for s in runs})
    parts = [
        f"Runs: {sum(len(r) for r in cells.values())} (seeds {', '.join(map(str, seeds))}), generated by "
        f"`python scripts/fashion_tables.py` from [runs.csv]({csv_link}).",
        "",
        "### Accuracy and training cost",
        "",
        *accuracy_table(cells),
        "",
    ]
    if any(r.get("resumed") == "True" for runs in cells.values() for r in runs.values()):
        parts += [
            "\\* a run of this cell was stopped and resumed from its checkpoint; checkpoints written before commit "
            "9808c77 do not carry the throughput timers, so such a run's images per CPU-second cover only the part "
            "after the resume.",
            "",
        ]
    if any(_mask_unseen(c, r) for c, r in cells.items()):
        parts += [
            "† masks through its own parametrization (sparsimony), which the per-layer count does not read; its "
            "runs' whole-model non-zeros are `rigl`'s at the same target to within 0.3 % (`nnz` in `summary.json`).",
            "",
        ]
    for sparsity in sorted({c[1] for c in cells if c[0] != "dense"}):
        rows = paired_rows(cells, sparsity)
        if rows:
            parts += [
                f"### Paired differences against {REFERENCE} at {sparsity:.0%} (test split)",
                "",
                *paired_table(rows),
                "",
            ]
    parts += [f"![test top-1 vs training images per CPU-second]({plot_link})", ""]
    return "\n".join(parts)


def _diff_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "–"
    if row["n"] < 2:
        return f"{row['mean']:+.2f} (1 pair)"
    return f"{row['mean']:+.2f} [{row['lo']:+.2f}, {row['hi']:+.2f}]"


def readme_summary(cells: dict[Cell, dict[int, dict]], page_link: str, csv_link: str, plot_link: str) -> str:
    """One row per method (grouped variants included): test top-1 (mean ± std over seeds) at each target, the paired
    difference against ``sparse_dynadiag`` with its 95 % CI, whole-run training speed against dense at 90 %."""
    dense_speed = _dense_speed(cells)
    targets = sorted({c[1] for c in cells if c[0] != "dense"})
    diffs = {t: {r["cell"]: r for r in paired_rows(cells, t)} for t in targets}
    kinds = sorted({(c[0], c[2], c[3]) for c in cells}, key=lambda k: _order((k[0], 0.0, k[1], k[2])))
    head = " | ".join(f"test top-1, {t:.0%} | − {REFERENCE}, {t:.0%} (pp, 95 % CI)" for t in targets)
    lines = [
        f"| method | {head} | training speed vs dense |",
        "|---|" + "---|---|" * len(targets) + "---|",
    ]
    for method, group, permute in kinds:
        row_cells = [(method, 0.0 if method == "dense" else t, group, permute) for t in targets]
        parts = []
        for t, cell in zip(targets, row_cells, strict=True):
            runs = cells.get(cell)
            if method == "dense" and t != targets[0]:
                parts += ["″", "″"]
                continue
            parts.append(_fmt(*_stats(runs, "test_top1")) if runs else "–")
            parts.append("reference" if method == REFERENCE and group == 1 else _diff_cell(diffs[t].get(cell)))
        # at 90 % (dense: its only cell); a method run at 98 % only gets its 98 % figure, marked
        speed_cell = next((c for c in row_cells if c in cells and c[1] in (0.0, 0.9)), None)
        speed_cell = speed_cell or next((c for c in row_cells if c in cells), None)
        speed = _stats(cells[speed_cell], "train_images_per_cpu_s_overall")[0] if speed_cell else math.nan
        ratio = f"{speed / dense_speed:.2f}x" if speed == speed and dense_speed == dense_speed else "–"
        if speed_cell and speed_cell[1] not in (0.0, 0.9) and ratio != "–":
            ratio += f" (at {speed_cell[1]:.0%})"
        lines.append(f"| {label((method, 0.0, group, permute))} | {' | '.join(parts)} | {ratio} |")
    seeds = sorted({s for runs in cells.values() for s in runs})
    counts = sorted({len(runs) for runs in cells.values()})
    coverage = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return "\n".join(
        [
            *lines,
            "",
            textwrap.fill(
                f"Test split (10,000 images, evaluated once per finished run), mean ± std over {coverage} seed(s) per "
                f"cell (seeds {', '.join(map(str, seeds))}); differences paired by seed, 95 % t intervals. Training "
                f"speed: whole-run training images per CPU-second (1 thread) at 90 % over dense. Generated by "
                f"`python scripts/fashion_tables.py` from [runs.csv]({csv_link}); Holm-adjusted p-values, "
                f"validation numbers and the recipe: [the study page]({page_link}).",
                width=118,
                break_on_hyphens=False,
            ),
            "",
            f"![Fashion-MNIST test top-1 vs training images per CPU-second]({plot_link})",
        ]
    )


def update_page(page: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    text = page.read_text(encoding="utf-8") if page.is_file() else f"{begin}\n{end}\n"
    if begin not in text or end not in text:
        raise SystemExit(f"error: {page} has no {begin} ... {end} block to fill")
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    page.write_text(pattern.sub(lambda _: f"{begin}\n{block}\n{end}", text), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", default=str(DEFAULT_CSV))
    parser.add_argument("--page", default=str(DEFAULT_PAGE), help="markdown page whose tables block is replaced")
    parser.add_argument("--readme", default=str(DEFAULT_README), help="file with the summary block ('' to skip)")
    args = parser.parse_args(argv)
    csv_path = Path(args.csv)
    cells = load(csv_path)
    plot_path = csv_path.with_name("test_top1_vs_cost.png")
    plot(cells, plot_path)
    page = Path(args.page)
    links = [os.path.relpath(p, page.resolve().parent) for p in (csv_path.resolve(), plot_path.resolve())]
    update_page(page, render(cells, *links))
    print(f"wrote {args.page} and {plot_path}")
    if args.readme:
        readme = Path(args.readme)
        base = readme.resolve().parent
        rel = [os.path.relpath(p, base) for p in (page.resolve(), csv_path.resolve(), plot_path.resolve())]
        update_page(readme, readme_summary(cells, *rel), README_BEGIN, README_END)
        print(f"wrote {args.readme}")


if __name__ == "__main__":
    main()
