"""Helpers shared by the tests of the sparse-training baselines (dynadiag.methods)."""

import timm
import torch
import torch.nn.functional as F

IMG, CLASSES = 16, 5


def tiny_vit(**kwargs):
    """A vit_tiny-shaped timm ViT with tiny dims: 2 blocks, width 32, 16 patches."""
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=IMG,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=CLASSES,
        in_chans=3,
        **kwargs,
    )


def run_steps(model, method, optimizer, steps, start=0, after_step=None, batch=4, clip=1.0, after_optimizer=None):
    """A manual training loop calling the method's hooks in the trainer's order (see methods/base.py).

    ``after_optimizer(step)`` runs right after ``optimizer.step()``, before the method's re-masking hook.
    """
    # One intra-op thread: on the shared 2-core machines OpenMP spin-waiting makes tiny ops ~100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_steps(model, method, optimizer, steps, start, after_step, batch, clip, after_optimizer)
    finally:
        torch.set_num_threads(threads)


def _run_steps(model, method, optimizer, steps, start, after_step, batch, clip, after_optimizer):
    for step in range(start, start + steps):
        method.on_step_start(step, model)
        x = torch.randn(batch, 3, IMG, IMG)
        y = torch.randint(0, CLASSES, (batch,))
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        method.on_after_backward(step, model, optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if after_optimizer is not None:
            after_optimizer(step)
        metrics = method.on_after_optimizer_step(step, model, optimizer)
        if after_step is not None:
            after_step(step, metrics)
