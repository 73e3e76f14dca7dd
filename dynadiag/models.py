"""Model construction: timm architectures sized to the data (image size, patch size, channels, classes).

timm's registered MLP-Mixer variants fix their patch size, so Mixers are built from
:class:`timm.models.mlp_mixer.MlpMixer` directly; CNNs take no image or patch size. Weights are always
randomly initialised (sparse training from scratch; nothing is downloaded).
"""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

__all__ = ["MIXER_ARCHS", "count_parameters", "create_model"]

#: name -> MlpMixer keyword arguments (the ``mixer_*16_224`` shapes, any patch size)
MIXER_ARCHS: dict[str, dict[str, Any]] = {
    "mixer_s16": dict(num_blocks=8, embed_dim=512),
    "mixer_s32": dict(num_blocks=8, embed_dim=512),
    "mixer_b16": dict(num_blocks=12, embed_dim=768),
    "mixer_l16": dict(num_blocks=24, embed_dim=1024),
}


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    img_size: int | None = None,
    patch_size: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a randomly initialised model.

    Args:
        name: a timm model name (``vit_base_patch16_224``, ``resnet50``, ...) or a key of :data:`MIXER_ARCHS`.
        num_classes: classifier outputs.
        in_chans: input channels.
        img_size: input resolution (ignored by CNNs).
        patch_size: patch size for ViT/DeiT/Mixer (ignored by CNNs).
        **kwargs: passed to the timm constructor (``depth``, ``embed_dim``, ``drop_path_rate``, ...).

    Returns:
        The model, mapping ``[B, in_chans, img_size, img_size]`` to logits ``[B, num_classes]``.
    """
    base = name.split(".")[0]
    if (base in MIXER_ARCHS or _is_patch_model(name)) and img_size and patch_size and img_size % patch_size:
        raise ValueError(f"{name}: image size {img_size} is not divisible by patch size {patch_size}")
    if base in MIXER_ARCHS:
        from timm.models.mlp_mixer import MlpMixer

        arch = {**MIXER_ARCHS[base], **kwargs}
        if img_size is not None:
            arch["img_size"] = img_size
        if patch_size is not None:
            arch["patch_size"] = patch_size
        return MlpMixer(num_classes=num_classes, in_chans=in_chans, **arch)
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model '{name}'")
    if _is_patch_model(name):
        if img_size is not None:
            kwargs["img_size"] = img_size
        if patch_size is not None:
            kwargs["patch_size"] = patch_size
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


def _is_patch_model(name: str) -> bool:
    return name.startswith(("vit_", "deit_", "deit3_"))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (``requires_grad`` ones only if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
