"""Sparsify a trained dense model: one-shot pruning or dense-to-diagonal conversion, then an optional fine-tune.

    python prune.py ckpt=outputs/<dense run> method=wanda sparsity=0.9
    python prune.py ckpt=outputs/<dense run> method=diag sparsity=0.9 finetune.epochs=5
    python prune.py ckpt=timm:vit_small_patch16_224 data=imagenet data.root=/data/imagenet method=dsnot
    python prune.py -m ckpt=<run> method=magnitude,wanda,dsnot,diag sparsity=0.5,0.8,0.9,0.95

Methods (:mod:`dynadiag.prune`): ``magnitude`` (layer-wise |w|), ``wanda`` (|w| x ||x||, per output row), ``dsnot``
(Wanda mask refined by DSnoT's training-free swaps) and ``diag`` (each target ``nn.Linear`` becomes a frozen
``DiagLinear`` keeping the K diagonals with the most activation-weighted energy). The result is written like a
``train.py`` run: ``checkpoints/last.pt`` (which ``eval.py`` evaluates), ``summary.json`` and ``metrics.jsonl`` in
the run directory. With ``finetune.epochs=N`` the normal :class:`~dynadiag.trainer.Trainer` trains N epochs with
the masks (``FixedMaskMethod``) or the diagonals (``FixedDiagMethod``) kept fixed.

With a dynadiag checkpoint, the model and data configs come from the checkpoint itself; ``timm:<name>`` builds
timm's pretrained ``<name>`` (downloaded from the Hugging Face Hub, or taken from its local cache with
``HF_HUB_OFFLINE=1``) for the data config's classes, channels and image size.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any
from urllib.parse import urlparse

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

import composition as comp
from dynadiag.checkpoint import load_checkpoint, save_checkpoint
from dynadiag.evaluate import evaluate
from dynadiag.prune import PruneConfig, calibration_batches, prune_model_
from dynadiag.sparsity import sparsity_stats
from dynadiag.throughput import measure_inference_throughput
from dynadiag.trainer import format_summary

TIMM_PREFIX = "timm:"
PATCH_MODELS = ("vit_", "deit_", "deit3_")  # as dynadiag.models.create_model: these take img_size
DENSE_TARGET = "dynadiag.methods.base.SparseMethod"
MASK_METHOD = "dynadiag.prune.masking.FixedMaskMethod"
DIAG_METHOD = "dynadiag.prune.masking.FixedDiagMethod"
DIAG_CONFIG = "dynadiag.sparsify.DiagSparsifyConfig"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub (``HF_ENDPOINT``, default huggingface.co) accepts a TCP connection."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_timm_pretrained(name: str, num_classes: int, in_chans: int, img_size: int | None) -> nn.Module:
    """timm's pretrained ``name`` with a new ``num_classes`` head, or one clear ``ValueError`` saying why not.

    ViT/DeiT models take ``img_size`` (timm resamples the position embedding); other models keep their own.
    """
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model '{name}' in ckpt=timm:{name}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline and not hub_reachable():
        # timm would retry the download for about a minute before failing; say it at once instead.
        raise ValueError(
            f"cannot load timm pretrained weights for '{name}': no network (the Hugging Face Hub is unreachable). "
            "Set HF_HUB_OFFLINE=1 to use weights already in the local Hugging Face cache, or prune a local "
            "checkpoint with ckpt=<dense checkpoint or run directory>"
        )
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
    if img_size is not None and name.startswith(PATCH_MODELS):
        kwargs["img_size"] = img_size
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:
        raise ValueError(
            f"cannot load timm pretrained weights for '{name}' ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "with HF_HUB_OFFLINE=1 they must already be in the local Hugging Face cache"
        ) from exc


def load_dense_model(cfg: DictConfig) -> tuple[nn.Module, dict[str, Any], dict[str, Any], str]:
    """The dense model named by ``cfg.ckpt``, the model and data configs that rebuild it, and a short model name."""
    source = str(cfg.ckpt)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    if source.startswith(TIMM_PREFIX):
        name = source[len(TIMM_PREFIX) :]
        model = load_timm_pretrained(name, data_cfg["num_classes"], data_cfg["in_chans"], data_cfg.get("img_size"))
        model_cfg = {
            "_target_": "dynadiag.models.create_model",
            "name": name,
            "num_classes": data_cfg["num_classes"],
            "in_chans": data_cfg["in_chans"],
        }
        if name.startswith(PATCH_MODELS) and data_cfg.get("img_size") is not None:
            model_cfg["img_size"] = data_cfg["img_size"]
        return model, model_cfg, data_cfg, name
    state = load_checkpoint(source)
    saved = state["config"]
    sparsifier = (saved.get("sparsifier") or {}).get("_target_")
    if sparsifier != DENSE_TARGET:
        raise ValueError(
            f"{source} is not a dense checkpoint (its sparsifier is {sparsifier}); prune a model trained with "
            "sparsifier=dense"
        )
    model_cfg, data_cfg = saved["model"], saved["data"]
    model = instantiate(model_cfg, _convert_="all")
    model.load_state_dict(state["model"])
    return model, model_cfg, data_cfg, (saved.get("choices") or {}).get("model", model_cfg.get("name"))


def prune_config(cfg: DictConfig) -> PruneConfig:
    return PruneConfig(
        method=str(cfg.method),
        sparsity=float(cfg.sparsity),
        include=None if cfg.include is None else list(cfg.include),
        exclude=tuple(cfg.exclude),
        sequential=bool(cfg.calibration.sequential),
        wanda_group=str(cfg.wanda.group),
        dsnot_init=str(cfg.dsnot.init),
        dsnot_max_cycles=int(cfg.dsnot.max_cycles),
        dsnot_update_threshold=float(cfg.dsnot.update_threshold),
        dsnot_var_power=float(cfg.dsnot.var_power),
        dsnot_same_sign=bool(cfg.dsnot.same_sign),
        diag_score=str(cfg.diag.score),
        backend=str(cfg.backend),
    )


def sparsifier_config(config: PruneConfig) -> dict[str, Any]:
    """The ``sparsifier`` entry of the output config: rebuilds the pruned structure for eval.py / fine-tuning."""
    common = {"sparsity": config.sparsity, "include": config.include, "exclude": list(config.exclude)}
    if config.method == "diag":
        sparsify = {"_target_": DIAG_CONFIG, **common, "backend": config.backend, "convs": False}
        return {"_target_": DIAG_METHOD, "config": sparsify, "score": config.diag_score}
    return {"_target_": MASK_METHOD, **common, "pruner": config.method}


def run_name(cfg: DictConfig, model: str, epochs: int) -> str:
    if cfg.run_name:
        return str(cfg.run_name)
    name = f"{model}-{cfg.method}-s{float(cfg.sparsity):g}-ft{epochs}-seed{cfg.seed}"
    if comp.is_multirun():
        name += f"-j{HydraConfig.get().job.num}"
    return name


def prune(cfg: DictConfig, run_dir: str | None = None) -> dict[str, Any]:
    """Run one pruning job; returns the summary (also written to ``<run_dir>/summary.json``)."""
    t_start = time.perf_counter()
    device = comp.validate_config(cfg)
    epochs = int(cfg.finetune.epochs)
    if epochs < 0:
        raise ValueError(f"finetune.epochs must be >= 0, got {epochs}")
    config = prune_config(cfg)
    run_dir = comp.run_dir(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    comp.seed_everything(int(cfg.seed))

    model, model_cfg, data_dict, model_name = load_dense_model(cfg)
    data = comp.build_data(data_dict, seed=int(cfg.seed))
    model.to(device)
    max_batches = cfg.trainer.eval_max_batches
    dense_eval = evaluate(model, data.val_loader, device, max_batches=max_batches)
    batches = None
    if config.needs_data:
        batches = calibration_batches(data.train_loader, int(cfg.calibration.num_batches), device)
    t_prune = time.perf_counter()
    report = prune_model_(model, config, batches)
    prune_seconds = time.perf_counter() - t_prune
    print(report, flush=True)
    oneshot = evaluate(model, data.val_loader, device, max_batches=max_batches)
    print(
        f"dense top1 {dense_eval['top1']:.2f} -> {config.method} at sparsity {report.sparsity:.4f}: "
        f"top1 {oneshot['top1']:.2f} (pruned in {prune_seconds:.1f} s)",
        flush=True,
    )

    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.update(model=model_cfg, data=data_dict, sparsifier=sparsifier_config(config))
    resolved["choices"] = {**comp.group_choices(), "model": model_name, "sparsifier": f"prune_{config.method}"}
    resolved["trainer"]["epochs"] = max(1, epochs)
    name = run_name(cfg, model_name, epochs)
    logger = comp.build_run_logger(cfg.logger, run_dir, name, resolved)
    info = {
        "run_name": name,
        "model": model_name,
        "data": data_dict["name"],
        "sparsity": config.sparsity,
        "seed": int(cfg.seed),
        "backend": str(cfg.backend),
        "prune_method": config.method,
        "prune_variant": f"{config.method}_{config.wanda_group}" if config.method == "wanda" else config.method,
        "source_ckpt": str(cfg.ckpt),
        "finetune_epochs": epochs,
        "dense_top1": dense_eval["top1"],
        "oneshot_top1": oneshot["top1"],
        "oneshot_top5": oneshot["top5"],
        "pruned_layers_sparsity": report.sparsity,
        "prune_seconds": prune_seconds,
    }
    try:
        if epochs == 0:
            summary = _finish_oneshot(model, config, oneshot, data, device, run_dir, resolved, logger, info)
            summary["wall_time_s"] = time.perf_counter() - t_start
        else:
            summary = _finetune(model, resolved, data, device, run_dir, logger, info)
    finally:
        logger.finish()
    with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    print(format_summary(summary))
    print(f"run directory: {run_dir}")
    return summary


def _finetune(model, resolved, data, device, run_dir, logger, info) -> dict[str, Any]:
    """Fine-tune the pruned model with its structure held fixed by the matching ``prune.masking`` method."""
    method = instantiate(resolved["sparsifier"], _convert_="all")
    print(method.apply_(model), flush=True)  # adopts the masks / frozen diagonals the pruner left in the model
    trainer = comp.build_trainer(resolved, model, method, data, device, run_dir, logger, resolved, info)
    summary = trainer.fit()
    summary["method"] = f"{info['prune_method']}+ft"
    return summary


def _finish_oneshot(model, config, result, data, device, run_dir, resolved, logger, info) -> dict[str, Any]:
    """No fine-tune: write the checkpoint and summary the trainer would have written after evaluating."""
    images = next(iter(data.val_loader))[0].to(device)
    infer = measure_inference_throughput(model, images, iters=int(resolved["trainer"]["inference_iters"]))
    stats = sparsity_stats(model)
    logger.log({f"val/{k}": result[k] for k in ("loss", "top1", "top5")} | {"val/top1_best": result["top1"]}, 0)
    save_checkpoint(
        os.path.join(run_dir, "checkpoints", "last.pt"),
        {
            "model": model.state_dict(),
            "method": {},
            "step": 0,
            "epoch": 0,
            "best_metric": result["top1"],
            "last_eval": {**result, "epoch": 0, "step": 0},
            "config": resolved,
        },
    )
    summary = {
        **info,
        "method": config.method,
        "epochs": 0,
        "steps": 0,
        "val_top1_best": result["top1"],
        "val_top1_final": result["top1"],
        "val_top5_final": result["top5"],
        "val_loss_final": result["loss"],
        "params": stats["params"],
        "nnz": stats["nnz"],
        "dense_weights": stats["dense"],
        "sparsity_effective": stats["effective"],
        "sparsity_target_layers": stats["target"] if config.method == "diag" else info["pruned_layers_sparsity"],
        "infer_images_per_s": infer,
        "device": str(device),
    }
    logger.log_summary(summary)
    return summary


@hydra.main(version_base="1.3", config_path="configs", config_name="prune")
def main(cfg: DictConfig) -> float | None:
    return comp.run_job(prune, cfg).get("val_top1_best")


if __name__ == "__main__":
    main()
