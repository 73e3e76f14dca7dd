"""scripts/collect_results.py on run directories produced by real (tiny) training runs."""

from __future__ import annotations

import csv
import os
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import collect_results  # noqa: E402

SMOKE = ["trainer=smoke", "trainer.max_steps=2", "data=synthetic", "model=vit_nano", "logger=local"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep folder like Hydra's multirun: jobs 0-2 trained for real, job 3 failed before its summary."""
    root = tmp_path_factory.mktemp("sweep")
    jobs = [["sparsity=0.5", "seed=0"], ["sparsity=0.5", "seed=1"], ["sparsity=0.9", "seed=0"], ["sparsity=2"]]
    for num, overrides in enumerate(jobs):
        run_dir = root / str(num)
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, "hydra.job.num=0"]))
        if num < 3:
            with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
                cfg = compose("config", overrides=[*SMOKE, *overrides])
            train.train(cfg, run_dir=str(run_dir))
    return root


def test_rows_tables_and_plot(sweep, tmp_path):
    rows, text = collect_results.collect(str(sweep), str(tmp_path))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    assert rows[0]["overrides"] == "sparsity=0.5 seed=0"  # hydra.* overrides are left out
    assert rows[2]["sparsity"] == 0.9 and rows[2]["method"] == "sparse_dynadiag"
    assert isinstance(rows[0]["val_top1_best"], float) and rows[0]["infer_images_per_s"] > 0
    groups = collect_results.aggregate(rows)
    assert [(g["sparsity"], g["seeds"]) for g in groups] == [(0.5, 2), (0.9, 1)]
    mean = (rows[0]["val_top1_final"] + rows[1]["val_top1_final"]) / 2
    assert groups[0]["val_top1_final"] == pytest.approx(mean)
    assert "## Mean +- std over seeds" in text and "| 3 | sparsity=2 | failed |" in text
    with open(tmp_path / "results.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    written = (tmp_path / "results.md").read_text() + (tmp_path / "results.csv").read_text()
    assert str(sweep.parent) not in written and text.startswith(f"# Results: {sweep.name}\n")  # no machine paths
    png = (tmp_path / "accuracy_vs_sparsity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_cli_writes_next_to_the_sweep_and_errors_on_empty(sweep, tmp_path, capsys):
    assert collect_results.main([str(sweep)]) == 0
    assert (sweep / "results.md").is_file()
    assert "sparsity=0.9 seed=0" in capsys.readouterr().out
    assert collect_results.main([str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err


def test_display_root_is_relative_to_the_output_root(tmp_path):
    assert collect_results.display_root(str(tmp_path / "multirun" / "2026-01-01" / "10-00-00")) == (
        "multirun/2026-01-01/10-00-00"
    )
    assert collect_results.display_root(str(tmp_path / "study")) == "study"
