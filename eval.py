"""Evaluate a checkpoint: top-1/top-5 and inference throughput, rebuilding the model from the checkpoint's config.

    python eval.py ckpt=outputs/<date>/<time>/checkpoints/best.pt
    python eval.py ckpt=outputs/<date>/<time> backend=reference     # run dir -> checkpoints/last.pt
    python eval.py ckpt=<...>/best.pt data=digits data.eval_batch_size=128
    python eval.py ckpt=<...>/best.pt export=<dir>   # also write the deployable artifact (docs/deploy.md)

``backend`` (kernel backend of frozen diagonal layers) and ``data`` may differ from training; the model
architecture always comes from the checkpoint, and its weights are loaded strictly.
"""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see train.py)
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import composition as comp
from dynadiag.checkpoint import CheckpointError, load_checkpoint
from dynadiag.evaluate import evaluate
from dynadiag.pretrained import save_pretrained
from dynadiag.sparsity import sparsity_stats
from dynadiag.throughput import measure_inference_throughput
from dynadiag.trainer import format_summary


def load_model(state: dict[str, Any], backend: str | None, device: torch.device, path: str) -> torch.nn.Module:
    """Rebuild the checkpoint's model (sparsified like in training) and load its weights strictly."""
    config = copy.deepcopy(state["config"])
    config["sparsifier"] = comp.upgrade_sparsifier_config(config.get("sparsifier") or {})
    sparsify_config = (config.get("sparsifier") or {}).get("config") or {}
    if backend is not None and "backend" in sparsify_config:
        sparsify_config["backend"] = backend
    model, _, _ = comp.build_sparse_model(config["model"], config["sparsifier"])
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(f"checkpoint {path} does not match the model its config builds: {detail}") from None
    if backend is not None:  # frozen layers created by loading take their backend from the sparsifier config
        for module in model.modules():
            if hasattr(module, "backend") and hasattr(module, "offsets"):
                module.backend = backend
    return model.to(device).eval()


def export_artifact(model: torch.nn.Module, config: dict[str, Any], directory: str) -> str:
    """Write ``model`` with :func:`dynadiag.save_pretrained`; when the run built its model with
    ``dynadiag.models.create_model``, record that call so ``from_pretrained(directory)`` needs no base model."""
    node = {k: v for k, v in (config.get("model") or {}).items() if not k.startswith("_")}
    buildable = (config.get("model") or {}).get("_target_") == "dynadiag.models.create_model" and "name" in node
    name = node.pop("name") if buildable else None
    save_pretrained(model, directory, base_model_name=name, base_model_kwargs=node if buildable else None)
    return os.path.abspath(directory)


def run_eval(cfg: DictConfig, out_dir: str | None = None) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt``; returns (and writes ``eval.json`` into ``out_dir``) the results."""
    if cfg.ckpt is None:
        raise ValueError("give a checkpoint: python eval.py ckpt=<run dir>/checkpoints/best.pt")
    device = comp.resolve_device(str(cfg.device))
    backend = None if cfg.backend is None else str(cfg.backend)
    if backend is not None:
        comp.validate_backend(backend, device)
    state = load_checkpoint(str(cfg.ckpt), map_location="cpu")
    model = load_model(state, backend, device, str(cfg.ckpt))
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else state["config"]["data"]
    data = comp.build_data(data_cfg, seed=0)
    autocast = None
    amp = (state["config"].get("trainer") or {}).get("amp", "off") if cfg.amp is None else str(cfg.amp)
    if amp in ("bf16", "fp16"):
        autocast = torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
    result = evaluate(model, data.val_loader, device, autocast)
    images = next(iter(data.val_loader))[0].to(device)
    ips = measure_inference_throughput(
        model, images, warmup=3, iters=int(cfg.inference_iters), min_seconds=float(cfg.min_seconds), autocast=autocast
    )
    stats = sparsity_stats(model)
    summary = {
        "checkpoint": os.path.abspath(str(cfg.ckpt)),
        "step": int(state["step"]),
        "data": data_cfg["name"],
        "backend": backend or state["config"].get("backend", "auto"),
        "val_top1": result["top1"],
        "val_top5": result["top5"],
        "val_loss": result["loss"],
        "val_images": result["count"],
        "params": stats["params"],
        "nnz": stats["nnz"],
        "sparsity_effective": stats["effective"],
        "infer_images_per_s": ips,
        "infer_batch_size": int(images.shape[0]),
        "device": str(device),
    }
    if cfg.get("export"):
        summary["exported_to"] = export_artifact(model, state["config"], str(cfg.export))
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "eval.json"), "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
    return summary


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    summary = comp.run_job(lambda c: run_eval(c, HydraConfig.get().runtime.output_dir), cfg)
    print(format_summary(summary))


if __name__ == "__main__":
    main()
