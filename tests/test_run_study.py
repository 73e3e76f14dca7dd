"""The Fashion-MNIST study runner: cell order, skipping recorded runs, recording runs that finished while it was gone,
and (slow) two real tiny runs through train.py with one row each."""

from __future__ import annotations

import csv
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from scripts import run_study  # noqa: E402

#: a two-step run on synthetic images: the experiment's wiring (method, schedules, test-set hook) stays as is
TINY = [
    "data=synthetic",
    "data.img_size=16",
    "data.patch_size=4",
    "data.batch_size=8",
    "data.num_train=32",
    "data.num_val=16",
    "trainer.max_steps=2",
    "trainer.final_inference_iters=1",
    "trainer.throughput_warmup_steps=0",
    "model.embed_dim=32",
    "model.depth=1",
    "backend=reference",
]


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_plan_orders_seeds_outermost_filters_methods_and_skips_recorded(tmp_path):
    csv_path = tmp_path / "runs.csv"
    args = run_study.parse_args(["--root", str(tmp_path), "--csv", str(csv_path), "--seeds", "0,1"])
    todo = run_study.plan(args)
    cells = run_study.study_cells()
    assert len(todo) == 2 * len(cells) and [s for _, s in todo] == [0] * len(cells) + [1] * len(cells)
    assert todo[0][0].name == "dense" and {c.name for c, _ in todo} >= {
        "sparse_dynadiag-s0.9-g8-perm",
        "sparse_dynadiag-s0.9-g32-perm",
        "diag_heur-s0.98",
    }
    grouped = run_study.Cell("sparse_dynadiag", 0.9, 32, True)
    assert grouped.overrides(2)[-2:] == ["sparsifier.config.group=32", "sparsifier.config.permute=true"]
    assert "sparsity=0" not in " ".join(run_study.Cell("dense", 0.0).overrides(0))
    # a cell with its own overrides runs the base sparsifier and is recorded under its label
    tuned = next(c for c in cells if c.name == "srigl_dt25-s0.98")
    assert tuned.overrides(1)[1:] == ["sparsifier=srigl", "seed=1", "sparsity=0.98", "regrow.delta_t=25"]
    assert tuned.key(1) == ("srigl_dt25", 0.98, 1, False, 1) != run_study.Cell("srigl", 0.98).key(1)
    run_study.append_row(csv_path, {"method": "dense", "sparsity": 0.0, "group": 1, "permute": False, "seed": 0})
    args = run_study.parse_args(["--root", str(tmp_path), "--csv", str(csv_path), "--methods", "dense,dynadiag"])
    assert [(c.name, s) for c, s in run_study.plan(args)] == [
        (name, seed)
        for seed in (0, 1, 2)
        for name in ("dense", "dynadiag-s0.9", "dynadiag-s0.98")
        if (name, seed) != ("dense", 0)
    ]
    with pytest.raises(SystemExit, match="no cell matches"):
        run_study.plan(run_study.parse_args(["--root", str(tmp_path), "--methods", "nope"]))


def test_a_run_that_finished_while_the_runner_was_gone_is_recorded_not_rerun(tmp_path, capsys):
    run_dir = tmp_path / "out" / "dense" / "seed0"
    run_dir.mkdir(parents=True)
    summary = {"val_top1_final": 88.5, "test_top1": 87.25, "train_images_per_cpu_s_overall": 2500.0, "steps": 10}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    stopped = tmp_path / "out" / "sparse_dynadiag-s0.9" / "seed0"
    stopped.mkdir(parents=True)
    (stopped / "summary.json").write_text(json.dumps({"val_top1_final": 50.0, "stopped_by": "SIGTERM"}))
    assert run_study.finished_summary(stopped) is None
    csv_path = tmp_path / "runs.csv"
    code = run_study.main(["--root", str(tmp_path / "out"), "--csv", str(csv_path), "--cells", "dense", "--seeds", "0"])
    assert code == 0 and "finished earlier: recorded" in capsys.readouterr().out
    (row,) = _rows(csv_path)
    assert (
        row["method"] == "dense"
        and float(row["test_top1"]) == 87.25
        and row["run_dir"] == os.path.join("dense", "seed0")
    )
    assert float(row["train_images_per_cpu_s_overall"]) == 2500.0 and row["commit"]


@pytest.mark.slow
def test_two_real_runs_two_at_a_time_one_row_each_then_nothing_to_do(tmp_path):
    csv_path, root = tmp_path / "runs.csv", tmp_path / "out"
    argv = [
        "--root",
        str(root),
        "--csv",
        str(csv_path),
        "--cells",
        "dense,sparse_dynadiag-s0.9-g8-perm",
        "--seeds",
        "0",
    ]
    assert run_study.main([*argv, *TINY]) == 0
    rows = _rows(csv_path)
    assert sorted((r["method"], r["group"], r["permute"]) for r in rows) == [
        ("dense", "1", "False"),
        ("sparse_dynadiag", "8", "True"),
    ]
    for row in rows:
        assert row["steps"] == "2" and row["val_top1"] and row["cpu_min"] and row["resumed"] == "False"
        assert float(row["train_images_per_cpu_s_overall"]) > 0
        assert (root / row["run_dir"] / "summary.json").is_file()
    assert run_study.plan(run_study.parse_args([*argv])) == []  # a rerun has nothing left to do
