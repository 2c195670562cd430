"""Callbacks that freeze or skip blocks set up DDP themselves (find_unused_parameters) before the model is wrapped."""

from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

import callbacks.core.unused_parameters as unused
from callbacks import LISA, BAdam, OwLore, ProgressiveLayerDrop

BLOCK_CALLBACKS = {"LISA": lambda: LISA(n_layers=1), "OwLore": lambda: OwLore(n_layers=1),
                   "BAdam": lambda: BAdam(), "ProgressiveLayerDrop": lambda: ProgressiveLayerDrop()}


@pytest.fixture
def announced(monkeypatch):
    lines = []
    monkeypatch.setattr(unused, "rank_zero_info", lines.append)
    return lines


@pytest.mark.parametrize("name", sorted(BLOCK_CALLBACKS))
def test_plain_ddp_gets_find_unused_parameters_and_it_is_announced(name, announced):
    strategy = DDPStrategy(process_group_backend="gloo")
    BLOCK_CALLBACKS[name]().setup(SimpleNamespace(strategy=strategy), None, "fit")
    assert strategy._ddp_kwargs["find_unused_parameters"] is True
    assert len(announced) == 1 and announced[0].startswith(f"{name}: DDP set to find_unused_parameters=True")


def test_a_strategy_already_set_up_is_left_alone_and_other_stages_change_nothing(announced):
    ready = DDPStrategy(find_unused_parameters=True, static_graph=False)
    LISA(n_layers=1).setup(SimpleNamespace(strategy=ready), None, "fit")
    plain = DDPStrategy()
    ProgressiveLayerDrop().setup(SimpleNamespace(strategy=plain), None, "validate")  # no DDP wrapper outside fit
    LISA(n_layers=1).setup(SimpleNamespace(strategy=SingleDeviceStrategy("cpu")), None, "fit")
    assert ready._ddp_kwargs == {"find_unused_parameters": True, "static_graph": False}
    assert "find_unused_parameters" not in plain._ddp_kwargs
    assert announced == []


def test_fsdp_without_original_parameters_is_refused_with_the_fix():
    fsdp = FSDPStrategy(use_orig_params=False)
    with pytest.raises(ValueError, match=r"LISA .*use FSDPStrategy\(use_orig_params=True\)"):
        LISA(n_layers=1).setup(SimpleNamespace(strategy=fsdp), None, "fit")
    ProgressiveLayerDrop().setup(SimpleNamespace(strategy=FSDPStrategy()), None, "fit")  # Lightning's default: fine
