"""The Lightning and Hugging Face callbacks (each skipped, with the reason, where its package is not installed)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from _methods_common import CLASSES, IMG, tiny_vit

import dynadiag
from dynadiag.candidate_layer import CandidateDiagLinear
from dynadiag.methods.sparse_dynadiag import SparseDynaDiagMethod
from dynadiag.sparsify import DiagSparsifyConfig

HAS_LIGHTNING = any(importlib.util.find_spec(n) is not None for n in ("lightning", "pytorch_lightning"))
HAS_HF = importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("accelerate") is not None
BATCHES, BATCH, EPOCHS, ACCUM = 8, 4, 2, 2
STEPS = EPOCHS * BATCHES // ACCUM


def make_method() -> SparseDynaDiagMethod:
    return SparseDynaDiagMethod(DiagSparsifyConfig(0.8), delta_t=2, freeze_fraction=0.5)


def dataset() -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCHES * BATCH, 3, IMG, IMG, generator=generator)
    return torch.utils.data.TensorDataset(x, torch.randint(0, CLASSES, (BATCHES * BATCH,), generator=generator))


def plain_reference() -> torch.nn.Module:
    """The same run as a plain loop with ``attach`` (accumulation over ``ACCUM`` batches, clipping at 1)."""
    torch.manual_seed(0)
    model = tiny_vit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dynadiag.attach(model, optimizer, make_method(), STEPS, BATCHES // ACCUM)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=BATCH)
    for _ in range(EPOCHS):
        for i, (x, y) in enumerate(loader):
            (F.cross_entropy(model(x), y) / ACCUM).backward()
            if (i + 1) % ACCUM == 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
    return model


def assert_frozen_alike(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    layers = [
        (a, b) for a, b in zip(model.modules(), reference.modules(), strict=True) if isinstance(a, CandidateDiagLinear)
    ]
    assert layers and all(a.is_frozen and b.is_frozen for a, b in layers)
    for a, b in layers:
        assert torch.equal(a.offsets, b.offsets)
        torch.testing.assert_close(a.V, b.V, rtol=0, atol=1e-5)


@pytest.mark.skipif(not HAS_LIGHTNING, reason="Lightning is not installed (pip install 'dynadiag[lightning]')")
def test_lightning_callback_trains_as_the_plain_loop(tmp_path):
    from dynadiag.integrations.lightning import DynaDiagCallback, pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_vit()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    torch.set_num_threads(1)
    reference = plain_reference()
    torch.manual_seed(0)
    module = Module()
    callback = DynaDiagCallback(make_method(), log_metrics=False)
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        accumulate_grad_batches=ACCUM,
        gradient_clip_val=1.0,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, torch.utils.data.DataLoader(dataset(), batch_size=BATCH))
    assert callback.attached.step == STEPS == trainer.global_step
    assert callback.state_dict()["step"] == STEPS
    assert_frozen_alike(module.net, reference)


@pytest.mark.skipif(not HAS_HF, reason="transformers/accelerate are not installed (pip install 'dynadiag[hf]')")
def test_hf_callback_trains_with_accumulation_and_freezes(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from dynadiag.integrations.hf import DynaDiagHFCallback

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_vit()

        def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
            logits = self.net(pixel_values)
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    class Images(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.data = dataset()

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            x, y = self.data[i]
            return {"pixel_values": x, "labels": y}

    class Recorder(TrainerCallback):  # a callback after DynaDiagHFCallback sees the method's metrics in the logs
        def __init__(self) -> None:
            self.logs: list[dict[str, float]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Classifier()
    callback, recorder = DynaDiagHFCallback(make_method()), Recorder()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        num_train_epochs=EPOCHS,
        max_grad_norm=1.0,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Images(), callbacks=[callback, recorder])
    layers = [m for m in model.modules() if isinstance(m, CandidateDiagLinear)]
    assert layers and all(m.is_stable for m in layers)  # sparsified before Trainer.train builds the optimizer
    trainer.train()
    assert callback.attached.step == STEPS == trainer.state.global_step
    assert all(m.is_frozen and m.offsets.numel() == m.k for m in layers)
    assert any(entry.get("sparse/frozen") == 1.0 for entry in recorder.logs)
    held = {id(p) for g in trainer.optimizer.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}  # the optimizer followed the freeze
