import pytest
import timm
import torch
from torch import nn

from dynadiag import DiagLinear
from dynadiag.prune.masking import FixedDiagMethod, FixedMaskMethod
from dynadiag.prune.pipeline import PruneConfig, prune_model_
from dynadiag.sparsify import DiagSparsifyConfig
from dynadiag.sparsity import MASK_BUFFER, mask_sparsity, masked_layers


def _tiny_vit():
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=16,
        patch_size=4,
        in_chans=1,
        num_classes=10,
        depth=2,
        embed_dim=32,
        num_heads=2,
    ).eval()


def _pruned(method, sparsity=0.8, **kw):
    torch.manual_seed(0)
    model = _tiny_vit()
    batches = [torch.randn(8, 1, 16, 16) for _ in range(2)]
    report = prune_model_(model, PruneConfig(method=method, sparsity=sparsity, backend="reference", **kw), batches)
    return model, report, batches


@pytest.mark.parametrize("method", ["magnitude", "wanda", "dsnot"])
def test_unstructured_methods(method):
    model, report, _ = _pruned(method, 0.8)
    assert len(report.layers) == 8 and abs(report.sparsity - 0.8) < 0.015
    for _, layer in masked_layers(model):
        mask = getattr(layer, MASK_BUFFER)
        assert mask.dtype == torch.bool and torch.equal(layer.weight != 0, mask)
    assert not hasattr(model.head, MASK_BUFFER) and not hasattr(model.patch_embed.proj, MASK_BUFFER)
    if method == "dsnot":
        assert all(r.error_after <= r.error_before for r in report.layers)
        assert sum(r.swaps for r in report.layers) > 0
        assert "swaps" in str(report)


def test_wanda_layer_group():
    model, report, _ = _pruned("wanda", 0.8, wanda_group="layer")
    assert abs(report.sparsity - 0.8) < 1e-3  # exact per layer, not per row
    rows = model.blocks[0].mlp.fc1.weight_mask.sum(1)
    assert rows.min() < rows.max()  # rows keep different numbers of weights
    with pytest.raises(ValueError, match="wanda_group"):
        PruneConfig(method="wanda", sparsity=0.5, wanda_group="column")


def test_methods_differ():
    masks = {m: _pruned(m)[0].blocks[1].mlp.fc1.weight_mask for m in ("magnitude", "wanda", "dsnot")}
    assert not torch.equal(masks["magnitude"], masks["wanda"])
    assert not torch.equal(masks["wanda"], masks["dsnot"])


def test_fixed_mask_finetune_keeps_masks_and_loads_into_fresh_model():
    model, _, batches = _pruned("wanda", 0.9)
    masks = {n: getattr(m, MASK_BUFFER).clone() for n, m in masked_layers(model)}
    method = FixedMaskMethod(sparsity=0.9)
    method.apply_(model)  # idempotent on a pruned model
    assert all(torch.equal(getattr(m, MASK_BUFFER), masks[n]) for n, m in masked_layers(model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    model.train()
    for step in range(3):
        loss = model(batches[0]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        method.on_after_backward(step, model, optimizer)
        optimizer.step()
        method.on_after_optimizer_step(step, model, optimizer)
    for name, layer in masked_layers(model):
        assert torch.equal(layer.weight != 0, masks[name])
    model.eval()
    fresh = _tiny_vit()
    FixedMaskMethod(sparsity=0.9).apply_(fresh)
    assert mask_sparsity(masked_layers(fresh)) == 0.0
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert abs(mask_sparsity(masked_layers(fresh)) - 0.9) < 0.02
    with torch.no_grad():
        torch.testing.assert_close(fresh(batches[1]), model(batches[1]))


def test_fixed_diag_loads_into_fresh_model_and_trains():
    model, _, batches = _pruned("diag", 0.9)
    fresh = _tiny_vit()
    method = FixedDiagMethod(DiagSparsifyConfig(0.9, backend="reference"))
    method.apply_(fresh)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(batches[1]), model(batches[1]))
    layers = [m for m in fresh.modules() if isinstance(m, DiagLinear)]
    assert all(m.is_frozen for m in layers)
    offsets = [m.offsets.clone() for m in layers]
    optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    method.on_step_start(0, fresh)
    fresh.train()
    fresh(batches[0]).square().mean().backward()
    optimizer.step()
    assert all(torch.equal(m.offsets, o) for m, o in zip(layers, offsets))
    with pytest.raises(RuntimeError, match="not frozen"):
        other = _tiny_vit()
        FixedDiagMethod(DiagSparsifyConfig(0.9)).apply_(other)
        FixedDiagMethod(DiagSparsifyConfig(0.9)).on_step_start(0, other)


def test_bad_config():
    with pytest.raises(ValueError, match="unknown pruning method"):
        PruneConfig(method="sparsegpt", sparsity=0.5)
    with pytest.raises(ValueError, match="needs calibration"):
        prune_model_(_tiny_vit(), PruneConfig(method="wanda", sparsity=0.5))
    with pytest.raises(ValueError, match=r"matches no nn\.Linear"):
        prune_model_(_tiny_vit(), PruneConfig(method="magnitude", sparsity=0.5, include=["nothing.*"]))
    assert isinstance(_tiny_vit().head, nn.Linear)
