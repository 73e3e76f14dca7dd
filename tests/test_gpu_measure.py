"""scripts/gpu_measure.py and scripts/gpu_check.sh on CPU: JSON lines, resume after a cut-off, fits, report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_measure  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="the dry run uses the cpu kernels")


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_fit_line_recovers_a_line():
    ks = [10, 20, 40, 80]
    a, b, r2 = gpu_measure.fit_line(ks, [0.5 + 0.01 * k for k in ks])
    assert a == pytest.approx(0.5) and b == pytest.approx(0.01) and r2 == pytest.approx(1.0)


def test_results_ignore_a_line_cut_off_mid_write(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"step": "ops", "group": "a"}\n{"step": "ops", "gro')
    res = gpu_measure.Results(tmp_path)
    assert res.done("ops", "a") and not res.done("ops", "b") and not res.done("ops")


def test_ops_step_resumes_where_it_was_cut_off(tmp_path):
    args = ["ops", "--device", "cpu", "--out", str(tmp_path), "--reps", "1"]
    assert gpu_measure.main(args) == 0
    first = _lines(tmp_path)
    groups = sorted({r["group"] for r in first if "group" in r})
    assert len(groups) == len(gpu_measure.CPU_SHAPES) * len(gpu_measure.CPU_TOKENS) * 2
    assert first[-1] == {**first[-1], "step": "ops", "status": "done"}
    assert {r["method"] for r in first if "method" in r} == {"diag_v1", "dense_fp32", "dense_bf16", "csr_fp32"}
    assert all(r["ms"] > 0 for r in first if "ms" in r)
    assert gpu_measure.main(args) == 0 and len(_lines(tmp_path)) == len(first)  # done: nothing re-measured
    # Simulate a run killed during the last group: drop that group's lines, the done line, add half a line.
    kept = [r for r in first if r.get("group") != groups[-1] and "status" not in r]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"step": "op')
    assert gpu_measure.main(args) == 0
    again = _lines_tolerant(tmp_path)
    assert sorted(r["group"] for r in again if "group" in r) == sorted(r["group"] for r in first if "group" in r)
    assert again[-1]["status"] == "done"


def _lines_tolerant(out: Path) -> list[dict]:
    rows = []
    for line in (out / "results.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def test_sweep_determinism_profile_and_report(tmp_path):
    base = ["--device", "cpu", "--out", str(tmp_path), "--reps", "1"]
    for step in ("ops", "ksweep", "determinism", "profile", "report"):
        assert gpu_measure.main([step, *base]) == 0
    rows = _lines(tmp_path)
    sweep = [r for r in rows if r.get("step") == "ksweep" and "status" not in r]
    assert {r["op"] for r in sweep} == {"fwd", "dx", "dv"} and all(len(r["points"]) >= 2 for r in sweep)
    det = [r for r in rows if r.get("step") == "determinism" and "status" not in r]
    assert det and all(r["bitwise_equal"] for r in det)  # the CPU kernels are deterministic
    profile = json.loads((tmp_path / "cost_profile_v1.json").read_text())
    assert set(profile["diag"]) == {"apply_wide", "apply_tall", "sddmm"} and profile["dense"]["fp32"] > 0
    report = (tmp_path / "README.md").read_text()
    assert "| proj | 40 | float32 | diag_v1 |" in report and "K sweep" in report


@pytest.mark.slow
def test_gpu_check_dry_run_cut_off_then_resumed(tmp_path):
    """A budget that ends mid-run records skips; the re-run does only what is missing and writes the report."""
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    script = str(ROOT / "scripts" / "gpu_check.sh")
    subprocess.run(["bash", script, str(out)], env={**env, "BUDGET_S": "25"}, capture_output=True, timeout=900)
    first = [r for r in _lines_tolerant(out) if str(r.get("step", "")).endswith(":run")]
    assert any(r["status"] == "skipped" for r in first)
    done_first = {r["step"] for r in first if r["status"] == "done"}
    subprocess.run(["bash", script, str(out)], env={**env, "BUDGET_S": "900"}, capture_output=True, timeout=900)
    runs = [r for r in _lines_tolerant(out) if str(r.get("step", "")).endswith(":run")]
    done = [r["step"] for r in runs if r["status"] == "done"]
    assert len(done) == len(set(done))  # nothing done twice
    assert done_first < set(done) and {"ops:run", "ksweep:run", "profile:run"} <= set(done)
    assert (out / "README.md").exists()


def test_tagged_diagonal_only_run_reuses_the_baselines(tmp_path):
    """gpu_check.sh measures v2 in its own process (``--tag _v2 --no-baselines``) after v1 and the baselines."""
    base = ["--device", "cpu", "--out", str(tmp_path), "--reps", "1"]
    assert gpu_measure.main(["ops", *base]) == 0
    assert gpu_measure.main(["ops", *base, "--no-baselines", "--tag", "_x"]) == 0
    tagged = [r for r in _lines(tmp_path) if r.get("step") == "ops_x" and "method" in r]
    assert tagged and {r["method"] for r in tagged} == {"diag_v1"}
    assert all(r["vs_dense_same_dtype"] is not None for r in tagged)  # from the untagged run's dense times
    assert len(gpu_measure.Results(tmp_path).of("ops", prefix=True)) > len(tagged)
