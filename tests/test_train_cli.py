"""``python train.py`` as a user runs it: a smoke run, a two-job sweep, resume, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["trainer=smoke", "data=synthetic", "model=vit_nano", "logger=local"]


def run_train(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # two subprocess runs; the in-process resume tests (test_trainer.py) cover the logic
def test_smoke_run_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    first = run_train(*SMOKE, "trainer.max_steps=3", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr
    assert "val_top1_best" in first.stdout and "infer_images_per_s" in first.stdout  # the summary table
    for name in ("metrics.jsonl", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt", ".hydra/config.yaml"):
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
    second = run_train(*SMOKE, "trainer.max_steps=12", f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'run2'}")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "at step 3" in second.stdout
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert summary["steps"] == 12  # frozen after the resume: K * D of P * D per layer (vit_nano at 90 %)
    assert summary["sparsity_target_layers"] == pytest.approx(1 - (10 + 4 + 13 + 13) * 32 / 12288, rel=1e-12)


def test_sweep_gives_distinct_jobs_and_a_collected_table(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train("-m", "sparsity=0.5,0.9", *SMOKE, "trainer.max_steps=2", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr
    assert "val_top1_best" in result.stdout and "infer_images_per_s" in result.stdout  # the summary tables
    for name in ("metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt", ".hydra/overrides.yaml"):
        assert (sweep / "0" / name).exists(), name
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]
    names = {s["run_name"] for s in summaries}
    assert len(names) == 2 and {s["sparsity"] for s in summaries} == {0.5, 0.9}
    collect = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "collect_results.py"), str(sweep)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert collect.returncode == 0, collect.stderr
    assert "sparsity=0.5" in collect.stdout and "sparsity=0.9" in collect.stdout
    for name in ("results.md", "results.csv", "accuracy_vs_sparsity.png"):
        assert (sweep / name).is_file()


def test_user_error_is_one_line(tmp_path):
    result = run_train(*SMOKE, "sparsity=1.2", f"hydra.run.dir={tmp_path}")
    expected = "error: DiagSparsifyConfig: sparsity must be in [0, 1), got 1.2"
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith(expected), result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_group_option_lists_choices(tmp_path):
    result = run_train("model=vit_zz", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "vit_b" in result.stderr and "Traceback" not in result.stderr


def test_error_message_looks_through_instantiate_wrappers(tmp_path):
    from hydra.utils import instantiate

    import composition
    import train

    try:
        instantiate({"_target_": "dynadiag.data.DataConfig", "name": "mnist"})
    except Exception as exc:
        assert composition.error_message(exc).startswith("unknown dataset 'mnist'; choose one of")
    else:
        raise AssertionError("expected an error")
    try:
        train.train(_compose_missing_cifar(tmp_path), run_dir=str(tmp_path))
    except Exception as exc:
        assert composition.error_message(exc).startswith("CIFAR-10 not found")
    else:
        raise AssertionError("expected an error")
    assert composition.error_message(RuntimeError("a bug")) is None  # bugs keep their traceback


def _compose_missing_cifar(tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        return compose("config", overrides=[*SMOKE, "data=cifar10", f"data.root={tmp_path / 'none'}"])
