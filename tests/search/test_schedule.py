"""Learning-rate and regularizer schedules (pure functions of the iteration)."""

import pytest

from dints3d.search.schedule import (
    cosine_lr,
    regularizer_ramp,
    warmup_iterations,
    weight_lr,
    weight_lr_factor,
)


def test_halving_after_warmup_at_decay_points():
    warmup = warmup_iterations(100, 0.5)
    assert warmup == 50
    factors = [weight_lr_factor(t, 100, warmup, [0.4, 0.8]) for t in (0, 49, 50, 69, 70, 89, 90, 99)]
    assert factors == [1, 1, 1, 1, 0.5, 0.5, 0.25, 0.25]


def test_cosine_runs_from_lr_to_lr_min():
    assert cosine_lr(0, 101, 0.025, 0.001) == pytest.approx(0.025)
    assert cosine_lr(50, 101, 0.025, 0.001) == pytest.approx(0.013)
    assert cosine_lr(100, 101, 0.025, 0.001) == pytest.approx(0.001)
    assert weight_lr(100, 101, 50, 0.025, "cosine", [0.4], 0.001) == pytest.approx(0.001)


def test_regularizer_ramp_is_zero_in_warmup_then_linear_to_one():
    assert [regularizer_ramp(t, 11, 5) for t in (0, 4, 5, 10)] == [0, 0, 0, 1]
    assert regularizer_ramp(7, 11, 5) == pytest.approx(0.4)
