"""β schedules: every kind, including the seed's per-epoch arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcvae.config import BetaConfig
from hpcvae.errors import ConfigError
from hpcvae.schedules import beta_schedule


def test_constant_and_plain_float():
    s = beta_schedule(BetaConfig(kind="constant", value=0.1))
    assert [s(e) for e in (0, 1, 50)] == [0.1, 0.1, 0.1]
    f = beta_schedule(0.25)
    assert f(0) == 0.25 and f(99) == 0.25
    assert f.to_dict()["kind"] == "constant" and f.to_dict()["value"] == 0.25


def test_seed_arrays_list_holds_last_value():
    # The seed built beta = beta * torch.ones(epochs), and tried increasing arrays.
    epochs = 5
    fixed = beta_schedule((0.1 * torch.ones(epochs)).tolist())
    assert [fixed(e) for e in range(epochs)] == pytest.approx([0.1] * epochs)
    ramp = beta_schedule(torch.linspace(0.0, 1.0, epochs))  # tensors accepted as-is
    assert [ramp(e) for e in range(epochs)] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert ramp(5) == pytest.approx(1.0) and ramp(100) == pytest.approx(1.0)
    arr = beta_schedule(np.array([0.3, 0.2]))
    assert (arr(0), arr(1), arr(7)) == pytest.approx((0.3, 0.2, 0.2))
    cfg = beta_schedule(BetaConfig(kind="list", values=[1.0, 2.0]))
    assert cfg.to_dict() == {
        "kind": "list",
        "value": 0.1,
        "values": [1.0, 2.0],
        "start": 0.0,
        "warmup_epochs": 0,
        "cycle_epochs": 4,
    }


def test_linear_warmup():
    s = beta_schedule(BetaConfig(kind="linear_warmup", start=0.0, value=1.0, warmup_epochs=4))
    assert [s(e) for e in range(7)] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    no_ramp = beta_schedule(BetaConfig(kind="linear_warmup", start=0.0, value=0.5, warmup_epochs=0))
    assert no_ramp(0) == 0.5


def test_cyclical_ramps_half_period_then_holds_and_restarts():
    s = beta_schedule(BetaConfig(kind="cyclical", start=0.0, value=1.0, cycle_epochs=4))
    assert [s(e) for e in range(9)] == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0, 0.0])
    odd = beta_schedule(BetaConfig(kind="cyclical", start=0.2, value=0.8, cycle_epochs=3))
    assert [odd(e) for e in range(4)] == pytest.approx([0.2, 0.5, 0.8, 0.2])


def test_bad_inputs():
    with pytest.raises(ConfigError, match="cycle_epochs"):
        beta_schedule(BetaConfig(kind="cyclical", cycle_epochs=1))
    with pytest.raises(ConfigError, match="epoch must be >= 0"):
        beta_schedule(0.1)(-1)
    with pytest.raises(ConfigError, match="β must be a number"):
        beta_schedule("0.1")
    with pytest.raises(ConfigError, match="non-empty"):
        beta_schedule([])
