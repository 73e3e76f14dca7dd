"""prune.py end to end: a dense model trained a few steps on digits, pruned, fine-tuned, evaluated by eval.py."""

import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # train.py, prune.py and eval.py are scripts at the repository root
import eval as eval_app  # noqa: E402
import prune as prune_app  # noqa: E402
import train as train_app  # noqa: E402
from dynadiag.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

CONFIGS = os.path.join(ROOT, "configs")
SMALL = ["model=vit_nano", "trainer=smoke", "logger=local", "device=cpu", "trainer.eval_max_batches=null"]


def _compose(name, overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on the shared 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dense")
    torch.set_num_threads(1)
    cfg = _compose("config", [*SMALL, "sparsifier=dense", "trainer.max_steps=4"])
    train_app.train(cfg, run_dir=str(run_dir))
    return run_dir


def _prune(dense_run, run_dir, method, epochs, *extra):
    overrides = [
        *SMALL,
        f"ckpt={dense_run}",
        f"method={method}",
        "sparsity=0.8",
        f"finetune.epochs={epochs}",
        "trainer.max_steps=2",
        "calibration.num_batches=2",
        *extra,
    ]
    return prune_app.prune(_compose("prune", overrides), run_dir=str(run_dir))


def _eval(run_dir, out_dir):
    return eval_app.run_eval(_compose("eval", [f"ckpt={run_dir}", "device=cpu", "inference_iters=2"]), str(out_dir))


@pytest.mark.parametrize(("method", "epochs"), [("wanda", 1), ("diag", 0)])
def test_pruned_checkpoint_round_trips_through_eval(dense_run, tmp_path, method, epochs):
    summary = _prune(dense_run, tmp_path / "run", method, epochs)
    assert summary["prune_method"] == method and summary["finetune_epochs"] == epochs
    assert abs(summary["pruned_layers_sparsity"] - 0.8) < 0.02
    state = load_checkpoint(tmp_path / "run")
    keys = state["model"].keys()
    if method == "diag":
        assert sum(k.endswith(".offsets") for k in keys) == 8
    else:
        assert sum(k.endswith(".weight_mask") for k in keys) == 8
        assert summary["steps"] == 2  # fine-tuned by the trainer
    result = _eval(tmp_path / "run", tmp_path / "eval")
    assert result["val_top1"] == pytest.approx(summary["val_top1_final"])
    assert result["sparsity_effective"] == pytest.approx(summary["sparsity_effective"])


def test_dsnot_and_magnitude_one_shot(dense_run, tmp_path):
    dsnot = _prune(dense_run, tmp_path / "dsnot", "dsnot", 0, "dsnot.max_cycles=5")
    magnitude = _prune(dense_run, tmp_path / "magnitude", "magnitude", 0)
    assert dsnot["pruned_layers_sparsity"] == pytest.approx(magnitude["pruned_layers_sparsity"], abs=0.01)
    assert dsnot["steps"] == 0 and os.path.isfile(tmp_path / "dsnot" / "summary.json")


def test_rejects_a_sparse_checkpoint(dense_run, tmp_path):
    state = load_checkpoint(dense_run)
    state["config"]["sparsifier"] = {"_target_": "dynadiag.methods.dynadiag.DynaDiagMethod", "sparsity": 0.9}
    save_checkpoint(tmp_path / "sparse.pt", {k: v for k, v in state.items() if k != "format_version"})
    with pytest.raises(ValueError, match="not a dense checkpoint"):
        _prune(tmp_path / "sparse.pt", tmp_path / "run", "wanda", 0)


def test_timm_without_network_fails_at_once():
    if prune_app.hub_reachable(timeout=2.0):
        pytest.skip("the Hugging Face Hub is reachable here")
    with pytest.raises(ValueError, match="no network"):
        prune_app.load_timm_pretrained("vit_tiny_patch16_224", 10, 1, 16)
    with pytest.raises(ValueError, match="unknown timm model"):
        prune_app.load_timm_pretrained("no_such_model", 10, 1, 16)


@pytest.mark.slow  # a fresh interpreter importing torch, timm and hydra: ~20 s on the shared machine
def test_timm_cli_offline_message(tmp_path):
    """With HF_HUB_OFFLINE=1 and an empty cache the CLI exits with one clear line, network or not."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "prune.py", "ckpt=timm:vit_tiny_patch16_224", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "cannot load timm pretrained weights for 'vit_tiny_patch16_224'" in lines[0]
