import pytest
import torch
from _methods_common import run_steps, tiny_vit

from dynadiag.methods.density import num_kept
from dynadiag.methods.gmp import GMPMethod, cubic_sparsity
from dynadiag.methods.masks import MaskSparsifyConfig


def test_cubic_schedule():
    assert cubic_sparsity(0, 0, 100, 0.9) == 0.0
    assert cubic_sparsity(50, 0, 100, 0.9) == pytest.approx(0.9 * (1 - 0.5**3))
    assert cubic_sparsity(100, 0, 100, 0.9) == cubic_sparsity(500, 0, 100, 0.9) == pytest.approx(0.9)
    assert cubic_sparsity(10, 20, 100, 0.9) == 0.0


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_gmp_prunes_on_schedule_from_dense(distribution):
    model = tiny_vit()
    method = GMPMethod(MaskSparsifyConfig(0.9, distribution=distribution), start_epoch=1, end_epoch=3, update_every=2)
    report = method.apply_(model)
    assert report.sparsity == 0.0  # starts dense
    method.bind(steps_per_epoch=2, total_steps=10)  # prune between steps 2 and 6
    assert [s for s in range(10) if method.is_update_step(s)] == [3, 5]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    previous = {n: m.weight_mask.clone() for n, m in method.layers}

    def check(step, metrics):
        pruned = kept = total = 0
        for name, module in method.layers:
            mask = module.weight_mask
            # exactly the scheduled number of weights, monotone (a pruned weight never returns), zeros stay zero
            expected = num_kept(mask.numel(), 1.0 - method.target_sparsity(name, step))
            assert int(mask.sum()) == expected, (name, step)
            assert not (mask & ~previous[name]).any()
            assert torch.all(module.weight[~mask] == 0)
            pruned += int(previous[name].sum()) - int(mask.sum())
            kept, total = kept + int(mask.sum()), total + mask.numel()
            previous[name] = mask.clone()
        if step in (3, 5):  # cubic: 0.9 x (1 - (1 - t)^3) at t = 2/4, then the final 0.9 at t = 4/4
            assert metrics["gmp/target_sparsity"] == pytest.approx(0.9 * (1 - 0.5**3) if step == 3 else 0.9)
            assert metrics["gmp/num_pruned"] == pruned > 0  # what the masks lost at this update, exactly
            assert metrics["sparsity/mask"] == pytest.approx(1 - kept / total, rel=1e-12)
        else:
            assert pruned == 0 and "gmp/num_pruned" not in metrics

    run_steps(model, method, optimizer, 10, after_step=check)
    final = method.report(model)
    sizes = {name: module.weight.numel() for name, module in method.layers}
    kept = sum(num_kept(n, method.densities[name]) for name, n in sizes.items())
    assert final.sparsity == pytest.approx(1 - kept / sum(sizes.values()), rel=1e-12)
    if distribution == "uniform":  # round(0.1 x numel) per block: qkv 3072, proj 1024, fc1 and fc2 4096
        assert final.sparsity == pytest.approx(1 - (307 + 102 + 410 + 410) / 12288, rel=1e-12)
    for name, module in method.layers:
        assert int(module.weight_mask.sum()) == num_kept(module.weight.numel(), method.densities[name])


def test_gmp_prunes_the_smallest_weights():
    model = tiny_vit()
    method = GMPMethod(MaskSparsifyConfig(0.5), end_epoch=1, update_every=1)
    method.apply_(model)
    method.bind(steps_per_epoch=1, total_steps=2)
    _, layer = method.layers[0]
    with torch.no_grad():
        layer.weight.copy_(torch.arange(layer.weight.numel(), dtype=torch.float32).view_as(layer.weight) - 1000)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    run_steps(model, method, optimizer, 1)
    magnitude = layer.weight.detach().abs()
    kept, pruned = magnitude[layer.weight_mask], (torch.arange(layer.weight.numel()) - 1000.0).abs()
    assert int(layer.weight_mask.sum()) == num_kept(layer.weight.numel(), 0.5)
    assert kept.min() >= pruned.sort().values[layer.weight.numel() // 2 - 1]


def test_bad_window():
    method = GMPMethod(MaskSparsifyConfig(0.9), start_epoch=3, end_epoch=2)
    with pytest.raises(ValueError, match="start_epoch"):
        method.bind(steps_per_epoch=10, total_steps=100)
