"""Every bad configuration (values, groups, devices, data) fails up front with one clear line
(``error_message``), before any training step; unknown config-group options are named with their choices
before Hydra composes."""

from __future__ import annotations

import os

import pytest
import torch
from hydra import compose, initialize_config_dir

import composition
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["data=synthetic", "data.img_size=8", "model=vit_nano", "trainer=smoke", "logger=local", "backend=reference"]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=[*SMOKE, *overrides])


BAD_CONFIGS = [
    pytest.param(["sparsity=1.0"], "DiagSparsifyConfig: sparsity must be in [0, 1), got 1.0", id="sparsity-one"),
    pytest.param(["sparsity=-0.1"], "DiagSparsifyConfig: sparsity must be in [0, 1), got -0.1", id="sparsity-neg"),
    pytest.param(
        ["backend=fast"],
        "unknown backend 'fast'; choose one of ['auto', 'reference', 'cpu', 'triton', 'cuda', 'dense'",
        id="backend",
    ),
    pytest.param(["backend=cuda"], "backend 'cuda' cannot run on cpu", id="backend-cuda-no-gpu", marks=NO_GPU),
    pytest.param(["device=cuda"], "device=cuda but no CUDA GPU is visible", id="device-cuda-no-gpu", marks=NO_GPU),
    pytest.param(
        ["data.name=mnist"],
        "unknown dataset 'mnist'; choose one of ['digits', 'fashion_mnist', 'cifar10'",
        id="dataset",
    ),
    pytest.param(["model.name=vit_nonexistent"], "unknown timm model 'vit_nonexistent'", id="model"),
    pytest.param(
        ["trainer.epochs=2", "sparsifier=dynadiag", "schedule.freeze_epoch=3"],
        "freeze_epoch=3 is beyond the run (2 epochs)",
        id="freeze-beyond-run",
    ),
    pytest.param(  # the default sparsifier (sparse_dynadiag) takes group/permute in its nested config node
        ["sparsifier.config.group=0"], "DiagSparsifyConfig: group must be a positive integer, got 0", id="group-zero"
    ),
    pytest.param(
        ["sparsifier.config.group=32"],  # vit_nano's proj has P = 32 diagonals: one group, nothing to select
        "sparse_dynadiag: group=32 does not fit layer 'blocks.0.attn.proj' (32->32, P=32 diagonals in 1 groups)",
        id="group-does-not-fit",
    ),
    pytest.param(["data=cifar10", "data.root=/nonexistent"], "CIFAR-10 not found: /nonexistent", id="cifar-dir"),
    pytest.param(["data=cifar100", "data.root=/nonexistent"], "CIFAR-100 not found: /nonexistent", id="cifar100-dir"),
    pytest.param(
        ["data=imagenet", "data.root=/nonexistent"], "ImageNet train split not found at /nonexistent", id="imagenet-dir"
    ),
    pytest.param(["resume=/nonexistent/last.pt"], "checkpoint not found: /nonexistent/last.pt", id="resume-missing"),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_CONFIGS)
def test_bad_config_is_one_clear_line(tmp_path, overrides, expected):
    with pytest.raises(Exception) as info:
        train.train(compose_cfg(overrides), run_dir=str(tmp_path))
    message = composition.error_message(info.value)  # what main() prints after "error: " (exit status 2)
    assert message is not None, f"not reported as a user error: {info.value!r}"
    assert "\n" not in message
    assert message.startswith(expected), message
    assert not (tmp_path / "checkpoints").exists()  # nothing was trained or written


def test_batch_not_divisible_across_ranks(monkeypatch):
    # WORLD_SIZE is what torchrun sets for every rank; validation reads it before any process group exists.
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError) as info:
        composition.validate_config(compose_cfg(["data.batch_size=32"]))
    assert (
        str(info.value) == "data.batch_size=32 (the global batch) is not divisible by the 3 ranks; use a multiple of 3"
    )
    composition.validate_config(compose_cfg(["data.batch_size=48"]))  # divisible: fine


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model=vit_zz"], "unknown model 'vit_zz'; choose one of ['deit_b', 'deit_s'"),
        (
            ["data=mnist"],
            "unknown data 'mnist'; choose one of "
            "['cifar10', 'cifar100', 'digits', 'fashion_mnist', 'imagenet', 'synthetic']",
        ),
        (["sparsifier=magic"], "unknown sparsifier 'magic'; choose one of ['dense', 'diag_heur', 'dynadiag'"),
        (["-m", "sparsifier=set,rigl,nope"], "unknown sparsifier 'nope'"),
        (["+experiment=table9"], "unknown experiment 'table9'"),
    ],
)
def test_unknown_group_option_lists_the_choices(args, expected):
    message = composition.check_group_overrides(["sparsity=0.9", *args])
    assert message is not None and message.startswith(expected), message


@pytest.mark.parametrize(
    "args",
    [
        ["model=vit_t", "data=synthetic", "sparsifier=rigl", "sparsity=0.5,0.9"],
        ["-m", "model=vit_t,vit_s", "+experiment=digits_dense", "hydra/launcher=slurm"],
        ["data.root=/x", "hydra.run.dir=outputs/x", "trainer.epochs=3", "seed=range(3)"],
    ],
)
def test_valid_overrides_pass_the_group_check(args):
    assert composition.check_group_overrides(args) is None


def test_slurm_launcher_config_composes():
    """``hydra/launcher=slurm`` resolves to the submitit Slurm launcher with only fields it knows (the plugin's
    structured config rejects unknown keys); one DDP task per GPU; requeue on timeout enabled."""
    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=8"]
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.tasks_per_node == 8 and launcher.nodes == 1
    assert launcher.timeout_min > 0 and launcher.max_num_timeout > 0 and cfg.resume == "auto"
