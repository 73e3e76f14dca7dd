import math

import pytest

from dynadiag.methods.density import layer_densities, num_kept

SHAPES = {
    "qkv": (384, 128),
    "proj": (128, 128),
    "fc1": (512, 128),
    "fc2": (128, 512),
    "conv": (64, 32, 3, 3),
    "thin": (10, 128),
}


def _overall(densities, shapes=SHAPES):
    kept = sum(num_kept(math.prod(s), densities[n]) for n, s in shapes.items())
    return kept / sum(math.prod(s) for s in shapes.values())


@pytest.mark.parametrize("density", [0.05, 0.1, 0.2, 0.5])
def test_uniform(density):
    densities = layer_densities(SHAPES, density, "uniform")
    assert all(d == density for d in densities.values())
    assert _overall(densities) == pytest.approx(density, abs=1e-3)


@pytest.mark.parametrize("density", [0.05, 0.1, 0.2, 0.5])
def test_erk_meets_budget_and_favours_thin_layers(density):
    densities = layer_densities(SHAPES, density, "erk")
    assert _overall(densities) == pytest.approx(density, abs=1e-3)
    assert all(0 < d <= 1 for d in densities.values())
    # ERK density ~ (out + in) / (out * in): the square 128x128 layer is denser than the 512x128 ones
    assert densities["proj"] > densities["fc1"] == pytest.approx(densities["fc2"])
    assert densities["thin"] > densities["proj"]
    # with the exponent at 0 every score is 1: ERK degenerates to uniform
    flat = layer_densities(SHAPES, density, "erk", erk_power_scale=0.0)
    assert all(d == pytest.approx(density) for d in flat.values())


def test_erk_makes_layers_dense_when_they_would_exceed_one():
    densities = layer_densities(SHAPES, 0.5, "erk")
    assert densities["thin"] == 1.0  # 10 x 128 would need density > 1
    assert _overall(densities) == pytest.approx(0.5, abs=1e-3)
    assert all(d < 1.0 for n, d in densities.items() if n != "thin")


def test_erk_dense_layers_count_toward_budget():
    densities = layer_densities(SHAPES, 0.2, "erk", dense=["conv"])
    assert densities["conv"] == 1.0
    assert _overall(densities) == pytest.approx(0.2, abs=1e-3)
    with pytest.raises(ValueError, match="too low"):
        layer_densities(SHAPES, 0.01, "erk", dense=["fc1", "fc2"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown density distribution"):
        layer_densities(SHAPES, 0.1, "erdos")
    with pytest.raises(ValueError, match="density"):
        layer_densities(SHAPES, 0.0, "uniform")
    with pytest.raises(ValueError, match="not among"):
        layer_densities(SHAPES, 0.1, "erk", dense=["head"])
    assert num_kept(100, 0.0001) == 1 and num_kept(100, 1.0) == 100
