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


def test_grouped_ops_measure_the_tensor_core_candidates(tmp_path, monkeypatch):
    """``ops --grouped 32``: grouped layers timed on grouped_triton and bsr_triton next to dense (CPU: the
    interpreter and torch's CPU BSR kernels; bf16 BSR has no CPU kernel and is recorded as NaN)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = ["ops", "--device", "cpu", "--out", str(tmp_path), "--reps", "1", "--grouped", "32", "--no-csr",
            "--versions", "grouped_triton", "bsr_triton", "--tag", "_g32"]  # fmt: skip
    assert gpu_measure.main(args) == 0
    rows = [r for r in _lines(tmp_path) if "method" in r]
    assert {r["method"] for r in rows} == {"grouped_triton", "bsr_triton", "dense_fp32", "dense_bf16"}
    assert {r["shape"] for r in rows} == {"proj-g32", "fc1-g32"}
    assert all(r["ms"] > 0 for r in rows if r["dtype"] == "float32")
    assert all(r["k"] % 32 == 0 or r["k"] == r["in"] for r in rows)  # whole groups of 32 offsets


def _copied_tree(tmp_path: Path) -> Path:
    """The files a device run gets: the working tree without .git (a copy may lack it)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("scripts", "dynadiag", "csrc", "tests", "pyproject.toml"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(src, tree / name)
    return tree


def test_gpu_check_dry_run_stays_in_budget_and_returns_one_archive(tmp_path):
    """The whole script in its CPU dry mode on a copied tree without .git: every step is recorded (run, skipped for
    the budget, or skipped as CUDA-only), the run ends within the budget, and DEST holds results.jsonl plus one
    archive named from GPU_CHECK_NAME."""
    import tarfile
    import time

    tree = _copied_tree(tmp_path)
    dest = tmp_path / "dest"
    budget = 20
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "BUDGET_S": str(budget), "GPU_CHECK_NAME": "dry", "OUT": str(dest)}  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(tree / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)  # fmt: skip
    elapsed = time.monotonic() - t0
    assert elapsed < budget + 15, proc.stdout[-2000:]
    assert sorted(p.name for p in dest.iterdir()) == ["dry.tar.gz", "results.jsonl"]
    rows = _lines_tolerant(dest)
    runs = {r["step"][:-4]: r for r in rows if str(r.get("step", "")).endswith(":run")}
    assert {"env", "build", "ops", "ops_v2", "tests_cuda", "ncu", "probe"} <= set(runs)
    assert runs["env"]["status"] == "done" and runs["ops_v2"]["note"] == "dry run (cpu)"
    assert any(r["note"] == "budget" for r in runs.values())  # the budget cut the later steps
    assert any(r.get("step") == "env" and r.get("device") == "cpu" for r in rows)
    with tarfile.open(dest / "dry.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"dry/results.jsonl", "dry/gpu_check.log", "dry/README.md"} <= names
    assert (tree / "docs" / "benchmarks" / "gpu" / "dry" / "results.jsonl").exists()


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
