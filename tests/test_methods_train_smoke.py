"""Every sparsifier option composes with the Hydra configs and runs a smoke training through ``train.py``."""

import json
import os
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # train.py is a script at the repository root, not part of the package
import train  # noqa: E402

CONFIGS = os.path.join(ROOT, "configs")
SPARSIFIERS = sorted(f[: -len(".yaml")] for f in os.listdir(os.path.join(CONFIGS, "sparsifier")) if f.endswith(".yaml"))
REGROW = {"set", "rigl", "srigl", "diag_heur"}
SMOKE = ["data=synthetic", "trainer=smoke", "model=vit_nano", "logger=local", "trainer.max_steps=3"]


def _compose(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("config", overrides=overrides)


def test_all_baselines_have_a_config():
    assert {"dense", "dynadiag", "static", "set", "rigl", "srigl", "diag_heur", "gmp"} <= set(SPARSIFIERS)


def test_regrow_group_composes_with_every_drop_grow_method():
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        for name in sorted(REGROW):
            for regrow in ("cosine", "linear", "constant"):
                cfg = compose("config", overrides=[f"sparsifier={name}", f"regrow={regrow}", "regrow.delta_t=7"])
                method = instantiate(cfg.sparsifier, _convert_="all")  # as train.py does, without the model
                assert type(method).name == name
                assert method.schedule.decay == regrow and method.schedule.delta_t == 7
                assert method.schedule.drop_fraction == 0.3 and method.schedule.t_end == 0.75


@pytest.mark.parametrize("name", SPARSIFIERS)
def test_smoke_training(name, tmp_path):
    if name == "sparsimony_rigl":
        pytest.importorskip("sparsimony")  # optional third-party reference (`make setup` installs it)
    overrides = [*SMOKE, f"sparsifier={name}", "sparsity=0.8"]
    if name in REGROW:
        overrides.append("regrow.delta_t=1")  # an update after each of the smoke run's steps
    if name == "gmp":
        overrides += ["sparsifier.update_every=1", "sparsifier.end_epoch=0.2"]
    if name == "dynadiag":
        overrides.append("schedule.freeze_fraction=0.1")
    cfg = _compose(overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on the shared 2-core machine: avoid OpenMP spin-waiting
    try:
        summary = train.train(cfg, run_dir=str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    assert summary["steps"] == 3 and summary["method"] == name
    assert os.path.isfile(tmp_path / "checkpoints" / "last.pt")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("throughput/infer_images_per_s" in r for r in records)
    if name != "dynadiag":  # DynaDiag's freeze restarts the train timer, which a 3-step run may not refill
        assert any("throughput/train_images_per_s" in r for r in records)
    if name in ("static", "set", "rigl", "srigl", "gmp"):
        state = torch.load(tmp_path / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]
        masks = [k for k in state if k.endswith("weight_mask")]
        assert len(masks) == 8  # vit_nano: 2 blocks x (qkv, proj, fc1, fc2)
    if name in REGROW:
        assert any(f"train/{name}/num_regrown" in r for r in records)


def _train(overrides, run_dir):
    cfg = _compose(overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.train(cfg, run_dir=str(run_dir))
    finally:
        torch.set_num_threads(threads)
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]


@pytest.mark.parametrize("name", ["set", "diag_heur"])
def test_resume_reproduces_the_uninterrupted_run(name, tmp_path):
    """2 steps + resume for 2 more == 4 steps: masks (or diagonals) and weights identical, bit for bit."""
    overrides = [*SMOKE[:-1], f"sparsifier={name}", "regrow.delta_t=1"]
    full = _train([*overrides, "trainer.max_steps=4"], tmp_path / "full")
    _train([*overrides, "trainer.max_steps=2"], tmp_path / "part")
    resumed = _train(
        [*overrides, "trainer.max_steps=4", f"resume={tmp_path / 'part' / 'checkpoints' / 'last.pt'}"],
        tmp_path / "part",
    )
    topology = [k for k in full if k.endswith(("weight_mask", "offsets"))]
    assert len(topology) == 8
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


@pytest.mark.slow
def test_diag_heur_resnet50_smoke(tmp_path):
    """``python train.py sparsifier=diag_heur model=resnet50 trainer=smoke`` on the digits (16x16, 1 channel), with
    drop/grow updates on the frozen DiagConv2d layers."""
    cfg = _compose(["sparsifier=diag_heur", "model=resnet50", "trainer=smoke", "logger=local", "regrow.delta_t=2"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train.train(cfg, run_dir=str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    assert summary["steps"] == 6 and summary["method"] == "diag_heur"
    assert summary["sparsity_target_layers"] == pytest.approx(0.899, abs=1e-3)  # 52 DiagConv2d layers, K of P each
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("train/diag_heur/num_regrown", 0) > 0 for r in records)
