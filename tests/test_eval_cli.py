"""``python eval.py`` rebuilds the model from a checkpoint's own config and reproduces the trainer's accuracy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

import eval as eval_app
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short real run that freezes (DynaDiag) and evaluates on the whole validation set."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = _compose(
        "config",
        [
            "trainer=smoke",
            "trainer.max_steps=10",
            "trainer.eval_max_batches=null",
            "data=synthetic",
            "model=vit_nano",
            "logger=local",
            "schedule.freeze_epoch=1",
        ],
    )
    summary = train.train(cfg, run_dir=str(run_dir))
    return run_dir, summary


def test_eval_cli_reproduces_final_accuracy(trained, tmp_path):
    run_dir, summary = trained
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "eval.py"),
            f"ckpt={run_dir / 'checkpoints' / 'last.pt'}",
            "backend=reference",
            "inference_iters=2",
            "min_seconds=0",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["step"] == summary["steps"] == 10
    assert report["val_top1"] == pytest.approx(summary["val_top1_final"], abs=1e-9)
    assert report["val_loss"] == pytest.approx(summary["val_loss_final"], rel=1e-5)
    assert report["backend"] == "reference" and report["infer_images_per_s"] > 0
    assert report["sparsity_effective"] == pytest.approx(summary["sparsity_effective"])


def test_eval_run_dir_and_other_data(trained, tmp_path):
    run_dir, summary = trained
    report = eval_app.run_eval(_compose("eval", [f"ckpt={run_dir}", "min_seconds=0", "inference_iters=1"]))
    assert report["val_top1"] == pytest.approx(summary["val_top1_final"])
    # same images and classes, another data config chosen from the group (here: a bigger synthetic val set)
    other = _compose("eval", [f"ckpt={run_dir}", "data=synthetic", "data.num_val=96", "min_seconds=0"])
    assert eval_app.run_eval(other)["val_images"] == 96


def test_eval_errors(trained, tmp_path):
    run_dir, _ = trained
    with pytest.raises(ValueError, match="give a checkpoint"):
        eval_app.run_eval(_compose("eval", []))
    with pytest.raises(ValueError, match="unknown backend"):
        eval_app.run_eval(_compose("eval", [f"ckpt={run_dir}", "backend=nope"]))
    # a checkpoint whose weights do not fit the model its config builds
    from dynadiag.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    state = load_checkpoint(run_dir)
    state["config"]["model"]["embed_dim"] = 48
    save_checkpoint(tmp_path / "bad.pt", state)
    with pytest.raises(CheckpointError, match="does not match the model"):
        eval_app.run_eval(_compose("eval", [f"ckpt={tmp_path / 'bad.pt'}"]))


def test_eval_exports_an_artifact_that_loads_without_the_run(trained, tmp_path):
    import torch

    import dynadiag
    from dynadiag.checkpoint import load_checkpoint

    run_dir, _ = trained
    cfg = _compose("eval", [f"ckpt={run_dir}", "min_seconds=0", "inference_iters=1", f"export={tmp_path / 'model'}"])
    assert eval_app.run_eval(cfg)["exported_to"] == str(tmp_path / "model")
    model = dynadiag.from_pretrained(tmp_path / "model").eval()  # built from the run's recorded create_model call
    trained_model = eval_app.load_model(load_checkpoint(run_dir), None, torch.device("cpu"), str(run_dir))
    x = torch.randn(3, 3, 16, 16)  # the synthetic data: 3 channels, 16 x 16
    torch.testing.assert_close(model(x), trained_model(x), rtol=0, atol=0)
