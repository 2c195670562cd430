"""Train/eval modes of a model's modules: which trainable modules sit in eval mode, and contexts that change modes
for a while and give every module its own mode back after.

``from_pretrained`` returns a model in eval mode and Lightning keeps the modes it finds, so a loaded model that is
not put into train mode trains without dropout and without gradient checkpointing (Hugging Face checkpoints a block
only while ``block.training``). The recipes put their models into train mode when they build them; the run-safety
callback ``TrainModeCheck`` uses :func:`trainable_in_eval` to stop a run that would train such modules anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def _holds_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def trainable_in_eval(model: nn.Module) -> list[str]:
    """Names of the modules in eval mode that take part in training: a module holding (in itself or below) a
    parameter that requires grad, or a parameter-free module (dropout, activation) directly inside such a module.

    A frozen part (no trainable parameter below it, e.g. a frozen vision tower) may stay in eval mode on purpose.
    """
    trainable = {module for module in model.modules() if _holds_trainable(module)}
    parent = {child: module for module in model.modules() for child in module.children()}
    found = []
    for name, module in model.named_modules():
        if module.training:
            continue
        if module in trainable or (next(module.parameters(), None) is None and parent.get(module) in trainable):
            found.append(name or "<root>")
    return found


@contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Whatever the body does to modes, every submodule gets its own train/eval mode back after."""
    modes = {module: module.training for module in model.modules()}
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside (generation, measurements); every submodule's own mode back after."""
    with modes_kept(model):
        model.eval()
        yield


@contextmanager
def dropout_off(model: nn.Module) -> Iterator[None]:
    """No dropout inside, gradient checkpointing kept: every module in eval mode except those that checkpoint
    (``gradient_checkpointing`` set: Hugging Face checkpoints while their ``training`` flag is on). Every mode back
    after.

    Dropout in the blocks comes from their submodules (attention, MLP, ``nn.Dropout``), which are in eval mode, in
    the families the recipes are tested on (tests/test_model_zoo.py); a block whose own forward applies dropout by
    its own flag (OPT's decoder layer) keeps it under gradient checkpointing.
    """
    with modes_kept(model):
        model.eval()
        for module in model.modules():
            if getattr(module, "gradient_checkpointing", False) is True:
                module.training = True
        yield
