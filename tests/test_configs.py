"""Every option of every config group composes (Hydra compose API) and instantiates into working objects."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

import composition
from dynadiag.data import DataConfig
from dynadiag.lr_schedule import LRSchedule, TimmLRSchedule, build_lr_scheduler
from dynadiag.methods.base import SparseMethod
from dynadiag.schedules import TemperatureSchedule
from dynadiag.sparsify import DiagSparsifyConfig
from dynadiag.sparsity import sparsity_stats
from dynadiag.trainer import TrainerConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
GROUPS = ("data", "model", "sparsifier", "schedule", "optim", "lr_schedule", "trainer", "logger")
SMALL_MODELS = ("vit_mini", "vit_nano")


def options(group: str) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONFIG_DIR, group)) if f.endswith(".yaml"))


def _compose(overrides: list[str], name: str = "config", hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=hydra_cfg)


def test_every_group_has_options_and_defaults_compose():
    for group in GROUPS:
        assert options(group), group
    cfg = _compose([])
    assert cfg.sparsity == 0.9 and cfg.data.name == "digits" and cfg.model.depth == 6
    assert cfg.sparsifier._target_.endswith(".SparseDynaDiagMethod")  # the improved method is the default


def test_default_sparsifier_is_sparse_dynadiag_by_value():
    method = instantiate(_compose([]).sparsifier, _convert_="all")
    assert method.name == "sparse_dynadiag" and method.sparsity == 0.9
    assert (method.density_start, method.freeze_fraction, method.alpha_lr_mult) == (3.0, 0.5, 1.0)
    assert (method.drop_score, method.normalize, method.t_max, method.t_min) == ("magnitude", False, 1.0, 0.05)
    method.bind(steps_per_epoch=10, total_steps=500)
    assert method.freeze_step == 250 and method.schedule.delta_t == 100  # regrow/cosine's cadence


def test_default_temperature_schedule_by_value():
    """The paper method's default recipe: cosine 5 -> 0.05, constant within an epoch, freeze at 20 % of 50 epochs."""
    cfg = _compose(["sparsifier=dynadiag"])
    method = instantiate(cfg.sparsifier, _convert_="all")
    assert isinstance(method.config, DiagSparsifyConfig) and method.config.sparsity == 0.9
    assert isinstance(method.schedule, TemperatureSchedule)
    method.bind(steps_per_epoch=10, total_steps=10 * cfg.trainer.epochs)  # 50 epochs of 10 steps
    assert method.freeze_step == 100  # epoch 10
    temperature = method.schedule
    assert [temperature(s) for s in (0, 9)] == [5.0, 5.0]  # held for the whole first epoch
    assert temperature(10) == pytest.approx(0.05 + 0.5 * 4.95 * (1 + math.cos(math.pi * 0.1)), rel=1e-12)
    assert temperature(55) == temperature(50) == pytest.approx(0.05 + 0.5 * 4.95, rel=1e-12)  # half-way: cos = 0
    assert temperature(100) == pytest.approx(0.05) and temperature(499) == pytest.approx(0.05)


@pytest.mark.parametrize("option", options("data"))
def test_data_options(option):
    cfg = _compose([f"data={option}"])
    data = instantiate(cfg.data, _convert_="all")
    assert isinstance(data, DataConfig) and data.name == option
    assert data.img_size % data.patch_size == 0


@pytest.mark.parametrize("option", options("model"))
def test_model_options(option):
    """Large models are built on the meta device (shapes only, no memory); small ones run a forward pass."""
    cfg = _compose([f"model={option}"])
    if option in SMALL_MODELS:
        model = instantiate(cfg.model, _convert_="all")
        out = model(torch.randn(2, cfg.data.in_chans, cfg.data.img_size, cfg.data.img_size))
        assert out.shape == (2, cfg.data.num_classes)
    else:
        with torch.device("meta"):
            model = instantiate(cfg.model, _convert_="all")
            out = model(torch.empty(2, cfg.data.in_chans, cfg.data.img_size, cfg.data.img_size))
        assert out.shape == (2, cfg.data.num_classes)


#: methods that start dense and reach their sparsity gradually (their layers are dense at step 0)
GRADUAL = {"gmp"}
#: methods backed by an optional third-party library that masks through its own parametrization (no weight_mask)
EXTERNAL = {"sparsimony_rigl": "sparsimony"}


def _target_sparsity(method, model) -> float:
    if hasattr(method, "effective_density"):  # counted on the weights the forward pass uses
        return 1.0 - method.effective_density()
    return sparsity_stats(model)["target"]


@pytest.mark.parametrize("option", options("sparsifier"))
def test_sparsifier_options_instantiate_and_apply(option):
    """Each method makes the model as sparse as ``sparsity`` says, and a training step keeps it so."""
    if option in EXTERNAL:
        pytest.importorskip(EXTERNAL[option])
    cfg = _compose([f"sparsifier={option}", "model=vit_nano", "data=synthetic"])
    method = instantiate(cfg.sparsifier, _convert_="all")
    assert isinstance(method, SparseMethod)
    model = instantiate(cfg.model, _convert_="all")
    method.apply_(model)  # the trainer's order: apply_ when the model is built, then bind
    method.bind(steps_per_epoch=8, total_steps=8 * cfg.trainer.epochs)
    expected = 0.0 if option == "dense" else cfg.sparsity
    assert method.sparsity == pytest.approx(expected)
    # measured on the layers (diagonal K/P or mask non-zeros), not read back from the config
    target = _target_sparsity(method, model)
    if option not in GRADUAL:
        assert target == pytest.approx(expected, abs=0.02), target
    optimizer = instantiate(cfg.optim, _convert_="all")(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randn(4, cfg.data.in_chans, cfg.data.img_size, cfg.data.img_size)
    method.on_step_start(0, model)
    model(x).sum().backward()
    method.on_after_backward(0, model, optimizer)
    optimizer.step()
    method.on_after_optimizer_step(0, model, optimizer)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)  # it trained
    assert _target_sparsity(method, model) == pytest.approx(target, abs=1e-6)  # the step kept the sparsity


@pytest.mark.parametrize("option", options("schedule"))
def test_schedule_options(option):
    cfg = _compose([f"schedule={option}", "model=vit_nano", "sparsifier=dynadiag"])  # the paper method's group
    method = instantiate(cfg.sparsifier, _convert_="all")
    method.bind(steps_per_epoch=10, total_steps=10 * cfg.trainer.epochs)
    t0, t_end = method.schedule(0), method.schedule(method.freeze_step)
    assert t0 == pytest.approx(cfg.schedule.t_max)
    if option != "constant":  # anneals towards t_min by the freeze (step decays by gamma, clamped at t_min)
        assert cfg.schedule.t_min - 1e-9 <= t_end < t0


@pytest.mark.parametrize("option", options("optim"))
def test_optim_options(option):
    cfg = _compose([f"optim={option}"])
    optimizer = instantiate(cfg.optim, _convert_="all")(torch.nn.Linear(3, 2))
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr)


@pytest.mark.parametrize("option", options("lr_schedule"))
def test_lr_schedule_options(option):
    sched = instantiate(_compose([f"lr_schedule={option}"]).lr_schedule, _convert_="all")
    if isinstance(sched, TimmLRSchedule):  # absolute rates: built on an optimizer, it ends at min_lr
        optimizer = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1)
        scheduler = build_lr_scheduler(optimizer, sched, steps_per_epoch=10, total_steps=100)
        for _ in range(100):
            scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(sched.min_lr)
        return
    assert isinstance(sched, LRSchedule)
    assert sched.factor(10**6, 10, 100) == pytest.approx(sched.min_lr_factor if sched.kind != "constant" else 1.0)


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options(option):
    """Every key of the option reaches the TrainerConfig unchanged (no YAML value lost or coerced on the way)."""
    node = OmegaConf.to_container(_compose([f"trainer={option}"]).trainer, resolve=True)
    tc = instantiate(node, _convert_="all")
    assert isinstance(tc, TrainerConfig)
    for key, value in node.items():
        if key != "_target_":
            assert getattr(tc, key) == value, key
    if option == "smoke":  # seconds, not minutes: a capped run that still evaluates and checkpoints
        assert tc.max_steps is not None and tc.max_steps <= 10 and tc.save_checkpoints and tc.eval_every_epochs == 1


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options(option, tmp_path, monkeypatch):
    """Each option writes metrics.jsonl; a W&B option runs offline (nothing uploaded, files in the run dir)."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _compose([f"logger={option}"])
    assert cfg.logger.mode != "online"  # no option uploads unless the user opts in
    logger = composition.build_run_logger(cfg.logger, str(tmp_path), "run", {"sparsity": 0.9})
    logger.log({"train/loss": 1.5}, step=3)
    logger.finish()
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 3 and record["train/loss"] == 1.5
    if "wandb" in cfg.logger.backends:
        assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline W&B run in the run directory"


@pytest.mark.parametrize("option", options("experiment"))
def test_experiment_options(option):
    cfg = _compose([f"+experiment={option}"], hydra_cfg=True)
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    for key in params:  # every swept key must exist in the composed config
        assert OmegaConf.select(cfg, key, default="__missing__") != "__missing__", key
    plain = OmegaConf.to_container(_compose([f"+experiment={option}"]), resolve=True)
    assert isinstance(instantiate(plain["sparsifier"], _convert_="all"), SparseMethod)
    instantiate(plain["trainer"], _convert_="all")


def test_example_experiment_has_sweep_grid():
    cfg = _compose(["+experiment=digits_sparsity_sweep"], hydra_cfg=True)
    assert "sparsity" in cfg.hydra.sweeper.params and "seed" in cfg.hydra.sweeper.params


def test_eval_config_composes_with_and_without_data():
    cfg = _compose(["ckpt=x.pt"], name="eval")
    assert cfg.ckpt == "x.pt" and cfg.get("data") is None
    assert _compose(["ckpt=x.pt", "data=digits"], name="eval").data.name == "digits"


def test_unknown_option_lists_choices():
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as info:
        _compose(["model=not_a_model"])
    assert "vit_b" in str(info.value) or "Available options" in str(info.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("device=tpu", "device must be auto, cpu or cuda"),
        ("backend=fastest", "unknown backend 'fastest'"),
    ],
)
def test_validate_config_rejects_bad_values(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        composition.validate_config(_compose([override]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_validate_config_cuda_without_gpu():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        composition.validate_config(_compose(["device=cuda"]))
