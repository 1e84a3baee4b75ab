"""Shared strict state-dict checks: every problem named at once, optional keys allowed either way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from amrg._state import load_state_strict, state_dict_mismatch


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 3)
        self.register_buffer("ids", torch.arange(4))


def test_every_problem_is_listed_and_nothing_is_loaded():
    net = _Net()
    state = {"lin.weight": torch.zeros(3, 5), "extra": torch.zeros(1), "ids": torch.arange(4)}
    bad = state_dict_mismatch(net, state)
    assert bad.missing == ["lin.bias"] and bad.unexpected == ["extra"]
    assert bad.mismatched == ["lin.weight: checkpoint (3, 5) vs model (3, 2)"]
    with pytest.raises(ValueError) as err:
        load_state_strict(net, state, "file.pt does not fit")
    assert str(err.value) == f"file.pt does not fit: {bad}"
    assert str(bad).startswith("missing keys ['lin.bias']; unexpected keys ['extra']; mis-shaped keys [")
    assert not net.lin.weight.eq(0).all()


def test_optional_keys_may_be_absent_or_surplus():
    source = _Net()
    state = {k: v.clone() for k, v in source.state_dict().items() if k != "ids"}
    target = _Net()
    assert not state_dict_mismatch(target, state, optional=["ids"])
    assert state_dict_mismatch(target, state).missing == ["ids"]
    load_state_strict(
        target, {**state, "old.position_ids": torch.zeros(2)}, "x", optional=["ids", "old.position_ids"]
    )
    assert torch.equal(target.lin.weight, source.lin.weight)
