import itertools
import math

import pytest

from dynadiag.schedules import SCHEDULES, TemperatureSchedule


@pytest.mark.parametrize("kind", SCHEDULES)
def test_schedule_bounds_and_endpoint(kind):
    schedule = TemperatureSchedule(kind=kind, t_max=5.0, t_min=0.05, end_step=100, steps_per_epoch=10)
    values = [schedule(s) for s in range(0, 150)]
    assert all(0.05 - 1e-9 <= v <= 5.0 + 1e-9 for v in values)
    assert values[0] == pytest.approx(5.0)
    if kind != "constant":
        assert schedule(100) == pytest.approx(0.05) and schedule(149) == pytest.approx(0.05)


@pytest.mark.parametrize("kind", ["linear", "cosine", "exponential", "step", "warmup_cosine"])
def test_monotone_decay(kind):
    schedule = TemperatureSchedule(kind=kind, end_step=50, steps_per_epoch=5, warmup_epochs=2, step_epochs=2)
    values = [schedule(s) for s in range(60)]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(values))


def test_cosine_midpoint_and_per_epoch():
    schedule = TemperatureSchedule(kind="cosine", t_max=5.0, t_min=0.05, end_step=100)
    assert schedule(50) == pytest.approx(0.05 + 0.5 * 4.95 * (1 + math.cos(math.pi / 2)))
    stepped = TemperatureSchedule(kind="cosine", end_step=100, steps_per_epoch=10, per_epoch=True)
    assert stepped(10) == stepped(19) and stepped(20) < stepped(19)


def test_warmup_and_cyclic_shapes():
    warm = TemperatureSchedule(kind="warmup_cosine", end_step=100, steps_per_epoch=10, warmup_epochs=3)
    assert warm(29) == pytest.approx(5.0) and warm(31) < 5.0
    cyclic = TemperatureSchedule(kind="cyclic", end_step=100, cycles=2)
    values = [cyclic(s) for s in range(101)]
    assert any(b > a for a, b in itertools.pairwise(values))  # it rises again at the start of cycle 2


def test_bad_schedule():
    with pytest.raises(ValueError, match="unknown temperature schedule"):
        TemperatureSchedule(kind="sawtooth")
    with pytest.raises(ValueError, match="t_min"):
        TemperatureSchedule(t_max=0.1, t_min=1.0)
