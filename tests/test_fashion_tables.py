"""Fashion-MNIST study tables: paired differences by seed with Holm per table, the page block and the plot."""

from __future__ import annotations

import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from scripts import fashion_tables, make_tables, run_study  # noqa: E402


def _write_runs(path, cells: dict[tuple, list[float]]) -> None:
    for (method, sparsity, group, permute), tests in cells.items():
        for seed, test in enumerate(tests):
            speed = 3000.0 if method == "dense" else 3600.0
            row = dict(method=method, sparsity=sparsity, group=group, permute=permute, seed=seed, val_top1=test + 0.5)
            row |= dict(test_top1=test, sparsity_effective=0.0 if method == "dense" else sparsity)
            resumed = method == "dense" and seed == 0  # stopped and resumed: marked in the table
            run_study.append_row(path, {**row, "train_images_per_cpu_s_overall": speed + seed, "resumed": resumed})


def test_page_block_pairs_by_seed_and_holm_adjusts_each_table(tmp_path):
    csv_path = tmp_path / "fashion_mnist" / "runs.csv"
    _write_runs(
        csv_path,
        {
            ("dense", 0.0, 1, False): [91.0, 90.5, 91.5],
            ("sparse_dynadiag", 0.9, 1, False): [89.0, 88.0, 90.0],
            ("rigl", 0.9, 1, False): [88.0, 86.0, 89.5],  # differences -1, -2, -0.5
            ("sparse_dynadiag", 0.9, 32, True): [88.5],
            ("sparse_dynadiag", 0.98, 1, False): [85.0, 84.0],
            ("dynadiag", 0.98, 1, False): [80.0, 80.0],
        },
    )
    page = tmp_path / "fashion_mnist.md"
    page.write_text(f"# title\n\n{fashion_tables.BEGIN}\nold\n{fashion_tables.END}\n\nafter\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"# product\n\n{fashion_tables.README_BEGIN}\nold\n{fashion_tables.README_END}\n\nlinks\n")
    fashion_tables.main(["--csv", str(csv_path), "--page", str(page), "--readme", str(readme)])
    text = page.read_text()
    assert text.startswith("# title") and text.rstrip().endswith("after") and "old" not in text
    assert (tmp_path / "fashion_mnist" / "test_top1_vs_cost.png").stat().st_size > 0
    assert "](fashion_mnist/runs.csv)" in text
    cells = fashion_tables.load(csv_path)
    rows = {fashion_tables.label(r["cell"]): r for r in fashion_tables.paired_rows(cells, 0.9)}
    assert set(rows) == {"dense", "rigl", "sparse_dynadiag g=32 +perm"}
    assert rows["rigl"]["mean"] == pytest.approx(-3.5 / 3) and rows["rigl"]["n"] == 3
    assert rows["dense"]["mean"] == pytest.approx(2.0)
    family = [rows["dense"]["p"], rows["rigl"]["p"]]  # the single-pair row has no p and is not counted
    assert sorted(r["p_holm"] for r in (rows["dense"], rows["rigl"])) == pytest.approx(sorted(make_tables.holm(family)))
    assert math.isnan(rows["sparse_dynadiag g=32 +perm"]["p_holm"])
    assert "| rigl | 3 | -1.17 |" in text and "at 98% (test split)" in text
    assert (
        "| – | dense \\* | 3 |" in text
        and "| 90% | rigl | 3 |" in text
        and "cover only the part" in text
        and "1.20x" in text
    )  # 3601 / 3001 img per CPU-s
    summary = readme.read_text()
    assert summary.startswith("# product") and summary.rstrip().endswith("links") and "old" not in summary
    # rigl at 90 %: 3 pairs (mean -1.17, its t interval), none at 98 %; dense's row spans the targets
    rigl = next(line for line in summary.splitlines() if line.startswith("| rigl |"))
    low, high = rows["rigl"]["lo"], rows["rigl"]["hi"]
    assert rigl == f"| rigl | 87.83 ± 1.76 | -1.17 [{low:+.2f}, {high:+.2f}] | – | – | 1.20x |"
    assert "| sparse_dynadiag | 89.00 ± 1.00 | reference | 84.50 ± 0.71 | reference | 1.20x |" in summary
    assert "| sparse_dynadiag g=32 +perm | 88.50 | -0.50 (1 pair) | – | – |" in summary
    assert "](fashion_mnist.md)" in summary and "](fashion_mnist/runs.csv)" in summary
