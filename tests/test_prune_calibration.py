import pytest
import torch
from torch import nn

from dynadiag.prune.calibration import (
    InputStats,
    calibration_batches,
    collect_input_stats,
    group_by_block,
    prune_layerwise_,
)


class _Counter(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, features)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.linear(x)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Counter(6), _Counter(6)])
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


def test_stats_match_direct_computation():
    x = torch.randn(3, 7, 5, dtype=torch.float64) * torch.arange(1, 6) + 0.5
    stats = InputStats.zeros(5)
    stats.update(x[:1])
    stats.update(x[1:])
    flat = x.reshape(-1, 5)
    assert stats.count == 21
    torch.testing.assert_close(stats.mean, flat.mean(0))
    torch.testing.assert_close(stats.var, flat.var(0, unbiased=False))
    torch.testing.assert_close(stats.norm, flat.norm(dim=0))
    torch.testing.assert_close(stats.mean_sq, flat.square().mean(0))


def test_hooks_removed_and_accumulators_sized_by_features():
    net = _Net()
    layers = {"blocks.0.linear": net.blocks[0].linear, "head": net.head}
    small = collect_input_stats(net, layers, [torch.randn(4, 6)])
    large = collect_input_stats(net, layers, [torch.randn(4096, 6), torch.randn(4096, 6)])
    for stats in (small, large):
        for name, s in stats.items():
            features = layers[name].in_features
            assert s.sum.shape == s.sum_sq.shape == (features,)
    assert large["head"].count == 8192
    for module in net.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks


def test_hooks_removed_when_forward_fails():
    net = _Net()
    with pytest.raises(RuntimeError):
        collect_input_stats(net, {"head": net.head}, [torch.randn(2, 5)])  # wrong feature size
    assert all(not m._forward_pre_hooks for m in net.modules())


def test_stop_early_skips_later_blocks():
    net = _Net()
    collect_input_stats(net, {"blocks.0.linear": net.blocks[0].linear}, [torch.randn(2, 6)] * 3)
    assert net.blocks[0].calls == 3 and net.blocks[1].calls == 0
    collect_input_stats(net, {"blocks.0.linear": net.blocks[0].linear}, [torch.randn(2, 6)], stop_early=False)
    assert net.blocks[1].calls == 1


def test_missing_layer_is_an_error():
    net = _Net()
    with pytest.raises(RuntimeError, match="never ran"):
        collect_input_stats(net, {"x": nn.Linear(6, 6)}, [torch.randn(2, 6)])


def test_group_by_block():
    names = ["blocks.0.attn.qkv", "blocks.0.mlp.fc2", "blocks.10.attn.qkv", "layer2.1.conv1", "head"]
    assert group_by_block(names) == [names[:2], [names[2]], [names[3]], ["head"]]


def test_sequential_calibration_sees_pruned_earlier_blocks():
    net = _Net()
    batches = [torch.randn(16, 6)]
    seen = []

    def prune_group(modules, stats):
        for name, module in modules.items():
            seen.append((name, stats[name].sum_sq.clone()))
            module.weight.data.zero_()  # prune everything: later blocks see relu(bias) only

    names = ["blocks.0.linear", "blocks.1.linear"]
    prune_layerwise_(net, names, batches, prune_group)
    bias = torch.relu(net.blocks[0].linear.bias.detach()).double()
    torch.testing.assert_close(seen[1][1], 16 * bias.square())
    assert net.training  # mode restored


def test_calibration_batches():
    loader = [(torch.full((2, 3), float(i)), torch.zeros(2)) for i in range(5)]
    batches = calibration_batches(loader, 3, "cpu")
    assert len(batches) == 3 and batches[2][0, 0] == 2
    with pytest.raises(ValueError):
        calibration_batches(loader, 0, "cpu")
