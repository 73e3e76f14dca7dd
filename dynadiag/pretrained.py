"""A deployable artifact: ``save_pretrained(model, dir)`` / ``from_pretrained(dir, base_model)``.

The folder holds two files, both readable without pickle, Hydra or the trainer:

- ``model.safetensors``: the model's ``state_dict``; frozen diagonal layers keep ``V`` (``[K, D]``), ``offsets``
  (``[K]``), ``bias`` and ``perm`` only (their ``alpha`` is unused once frozen and is left out);
- ``dynadiag_config.json``: the format version and one spec per sparse layer (type, shapes, sparsity, ``k``,
  group, frozen or soft, permuted, bias), the masked dense layers, and optionally how to build the base model
  (a timm model name and its keyword arguments).

``from_pretrained`` takes the dense model the sparse one was made from (same architecture, any weights), puts a
diagonal layer of the saved layout at every recorded name, and loads the weights with ``strict=True``. The kernel
backend is runtime state: it is chosen at load time (``backend="auto"`` by default), never saved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynadiag.candidate_layer import CandidateDiagLinear
from dynadiag.conv import DiagConv2d
from dynadiag.layers import DiagLinear
from dynadiag.sparsity import MASK_BUFFER, masked_layers
from dynadiag.targets import replace_module_

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "WEIGHTS_NAME", "from_pretrained", "save_pretrained"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "dynadiag_config.json"
FORMAT_VERSION = 1
#: state-dict entries a frozen diagonal layer needs (``alpha``, candidate sets and dropped values are training state)
FROZEN_KEYS = ("V", "bias", "offsets", "perm")
#: soft-phase settings the trainer's schedules set on a layer; saved so a soft layer computes the same after loading
RUNTIME_ATTRS = ("temperature", "hardness", "normalize")
LAYER_TYPES: dict[str, type[nn.Module]] = {
    "DiagLinear": DiagLinear,
    "CandidateDiagLinear": CandidateDiagLinear,
    "DiagConv2d": DiagConv2d,
}


def _layer_spec(layer: DiagLinear | DiagConv2d) -> dict[str, Any]:
    frozen = layer.is_frozen
    spec: dict[str, Any] = {
        # a frozen CandidateDiagLinear is an ordinary frozen DiagLinear: deployments never need the subclass
        "type": "DiagLinear" if frozen and isinstance(layer, DiagLinear) else type(layer).__name__,
        "frozen": frozen,
        "sparsity": layer.sparsity,
        "k": layer.k,
        "bias": layer.bias is not None,
    }
    if isinstance(layer, DiagLinear):
        spec.update(
            in_features=layer.in_features,
            out_features=layer.out_features,
            group=layer.group,
            permuted=layer.perm is not None,
        )
    else:
        spec.update(
            in_channels=layer.in_channels,
            out_channels=layer.out_channels,
            kernel_size=list(layer.kernel_size),
            stride=list(layer.stride),
            padding=layer.padding if isinstance(layer.padding, str) else list(layer.padding),
            dilation=list(layer.dilation),
        )
    if not frozen:
        spec["runtime"] = {a: getattr(layer, a) for a in RUNTIME_ATTRS if hasattr(layer, a)}
    return spec


def _diag_layers(model: nn.Module) -> list[tuple[str, DiagLinear | DiagConv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DiagLinear | DiagConv2d)]


def _weights(model: nn.Module, frozen_prefixes: set[str]) -> dict[str, torch.Tensor]:
    """The state dict without frozen layers' training state, each tensor contiguous and owning its storage."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in frozen_prefixes and leaf not in FROZEN_KEYS:
            continue
        value = value.detach().contiguous()
        storage = value.untyped_storage().data_ptr()
        if storage in seen:  # safetensors refuses tensors that share memory (tied weights): give each its own
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    return tensors


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    base_model_name: str | None = None,
    base_model_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a safetensors file and a JSON layer config into ``directory`` (created if needed).

    Args:
        model: a model with :class:`~dynadiag.DiagLinear` / :class:`~dynadiag.DiagConv2d` layers (frozen or soft)
            and/or masked dense layers.
        directory: output folder; existing files of the same names are replaced.
        base_model_name: optional timm model name (or a :data:`dynadiag.models.MIXER_ARCHS` key); with it,
            :func:`from_pretrained` can build the base model itself.
        base_model_kwargs: its keyword arguments (JSON-serialisable), e.g. ``num_classes``, ``img_size``; built with
            :func:`dynadiag.models.create_model` when they include ``num_classes``, else ``timm.create_model``.

    Returns:
        The folder written.
    """
    from safetensors.torch import save_file  # ships with timm; imported here so `import dynadiag` stays light

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = _diag_layers(model)
    frozen = {name for name, layer in layers if layer.is_frozen}
    config: dict[str, Any] = {
        "format": "dynadiag",
        "format_version": FORMAT_VERSION,
        "weights": WEIGHTS_NAME,
        "layers": {name: _layer_spec(layer) for name, layer in layers},
        "masked_layers": [name for name, _ in masked_layers(model)],
    }
    if base_model_name is not None:
        config["base_model"] = {"name": base_model_name, "kwargs": dict(base_model_kwargs or {})}
    save_file(_weights(model, frozen), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"from_pretrained: {path} not found; write the folder with dynadiag.save_pretrained")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"from_pretrained: {path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != "dynadiag":
        raise ValueError(f'from_pretrained: {path} is not a dynadiag config (no "format": "dynadiag")')
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"from_pretrained: {path} has format version {config['format_version']}, newer than this dynadiag "
            f"({FORMAT_VERSION}); upgrade dynadiag"
        )
    return config


def _build_base(config: dict[str, Any], directory: Path) -> nn.Module:
    base = config.get("base_model")
    if base is None:
        raise ValueError(
            f"from_pretrained: {directory} records no base model; pass base_model= (the dense model it was made from)"
        )
    kwargs = dict(base.get("kwargs") or {})
    if "num_classes" in kwargs:  # the training framework's constructor: timm names and the MLP-Mixer shapes
        from dynadiag.models import create_model

        return create_model(base["name"], **kwargs)
    import timm

    return timm.create_model(base["name"], pretrained=False, **kwargs)


def _make_layer(name: str, spec: dict[str, Any], old: nn.Module, backend: str) -> nn.Module:
    cls = LAYER_TYPES.get(spec.get("type"))
    if cls is None:
        raise ValueError(f"from_pretrained: layer '{name}' has unknown type {spec.get('type')!r}")
    weight = next(iter(old.parameters()), None)
    factory = {"device": weight.device, "dtype": weight.dtype} if weight is not None else {}
    if cls is DiagConv2d:
        _check_shape(name, old, (spec["out_channels"], spec["in_channels"]), "in_channels", "out_channels")
        layer = DiagConv2d(
            spec["in_channels"],
            spec["out_channels"],
            tuple(spec["kernel_size"]),
            tuple(spec["stride"]),
            spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"]),
            tuple(spec["dilation"]),
            bias=spec["bias"],
            sparsity=spec["sparsity"],
            **factory,
        )
    else:
        _check_shape(name, old, (spec["out_features"], spec["in_features"]), "in_features", "out_features")
        layer = cls(
            spec["in_features"],
            spec["out_features"],
            bias=spec["bias"],
            sparsity=spec["sparsity"],
            backend=backend,
            group=spec["group"],
            **factory,
        )
        if spec["permuted"]:
            layer.set_permutation_(torch.empty(spec["in_features"], dtype=torch.long))  # filled by the load
    layer.layer_name = name
    if spec["frozen"]:
        _frozen_layout_(layer, spec["k"])
    else:
        for attr, value in spec.get("runtime", {}).items():
            setattr(layer, attr, value)
    return layer


def _check_shape(name: str, old: nn.Module, shape: tuple[int, int], in_attr: str, out_attr: str) -> None:
    # the base model's layer (dense or already diagonal) must have the saved layer's sizes
    got = (getattr(old, out_attr, None), getattr(old, in_attr, None))
    if got != shape:
        raise ValueError(
            f"from_pretrained: layer '{name}' is {shape[1]}->{shape[0]} in the artifact but {got[1]}->{got[0]} "
            f"({type(old).__name__}) in base_model; build base_model with the same architecture"
        )


@torch.no_grad()
def _frozen_layout_(layer: DiagLinear | DiagConv2d, k: int) -> None:
    """Give a fresh layer the frozen storage (``V`` ``[k, D, ...]``, ``offsets`` ``[k]``) and no ``alpha``."""
    trailing, factory = layer.V.shape[1:], {"device": layer.V.device, "dtype": layer.V.dtype}
    del layer.V, layer.alpha
    layer.V = nn.Parameter(torch.empty(k, *trailing, **factory))
    layer.register_buffer("alpha", None)
    layer.offsets = torch.empty(k, dtype=torch.long, device=factory["device"])
    layer.k = k


def from_pretrained(
    directory: str | os.PathLike,
    base_model: nn.Module | None = None,
    *,
    backend: str = "auto",
    device: torch.device | str | None = None,
) -> nn.Module:
    """Rebuild a model written by :func:`save_pretrained`.

    Args:
        directory: the folder :func:`save_pretrained` wrote.
        base_model: the dense architecture the model was made from (its weights are overwritten); ``None``
            builds it from the recorded ``base_model_name`` and ``base_model_kwargs``.
        backend: kernel backend of the loaded diagonal layers (runtime state, not saved).
        device: where to load the weights; default: where ``base_model``'s parameters are.

    Returns:
        ``base_model``, edited in place: diagonal layers at the recorded names, every weight loaded (``strict``).

    Raises:
        FileNotFoundError: the folder lacks the config or the weights file.
        ValueError: the config is not a dynadiag config or is newer than this code, or ``base_model`` lacks a
            recorded layer or has other sizes.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config = _read_config(directory)
    weights_path = directory / config.get("weights", WEIGHTS_NAME)
    if not weights_path.is_file():
        raise FileNotFoundError(f"from_pretrained: weights file {weights_path} not found")
    model = _build_base(config, directory) if base_model is None else base_model
    if device is not None:
        model.to(device)
    modules = dict(model.named_modules())
    for name, spec in config["layers"].items():
        if name not in modules:
            raise ValueError(f"from_pretrained: base_model has no module '{name}'; pass the same architecture")
        replace_module_(model, name, _make_layer(name, spec, modules[name], backend))
    for name in config.get("masked_layers", []):
        if name not in modules or not isinstance(getattr(modules[name], "weight", None), torch.Tensor):
            raise ValueError(f"from_pretrained: base_model has no weighted module '{name}' for a saved mask")
        module = modules[name]
        if not isinstance(getattr(module, MASK_BUFFER, None), torch.Tensor):
            module.register_buffer(MASK_BUFFER, torch.ones_like(module.weight, dtype=torch.bool))
    first = next(iter(model.parameters()), None)
    load_device = str(first.device) if first is not None else "cpu"
    model.load_state_dict(load_file(str(weights_path), device=load_device), strict=True)
    return model
