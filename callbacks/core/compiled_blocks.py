"""Compile a model's transformer blocks one by one, so that layer-wise training never recompiles for long.

``torch.compile`` of the whole model would see LISA/OwLore/BAdam's frozen blocks and progressive layer drop's
skipped blocks as a new program at every switch. Compiling each block's ``forward`` instead gives one small
program per block *state*: the blocks of a model share their code, so the compiled graphs are shared too, and a
block is only ever trainable or frozen, in training or in evaluation. Once each state has been seen, switching
the trained blocks or the dropped blocks compiles nothing more (``tests/test_compile.py`` counts it).

The compiled forward is an instance attribute of each block (the class's ``forward`` stays), so the block is
the same module object: :func:`~callbacks.core.blocks.find_blocks` finds it, and parameter names and
``state_dict`` keys are those of the eager model (no ``_orig_mod.``), so checkpoints load either way.
Gradient checkpointing stays outside the compiled code: recent transformers releases checkpoint inside a layer's
``forward`` (``forward_with_checkpointing``), which torch.compile cannot trace (a graph break that leaves the whole
block eager), so there the layer's own forward is compiled and checkpointed from outside, as older releases (which
checkpoint in ``__call__``) do anyway.
:class:`~callbacks.layer_drop.ProgressiveLayerDrop` wraps the compiled forward (its skip decision stays outside
the compiled code). A block called with a KV cache (generation) runs eagerly: the cache is Python state that
would give every layer its own program.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
from torch import nn

from callbacks.core.blocks import find_blocks

try:  # a KV cache object, passed by keyword or (GPT-2) by position
    from transformers.cache_utils import Cache as _Cache
except ImportError:  # transformers without cache classes: only the keyword names below tell
    _Cache = ()

MIN_RECOMPILE_LIMIT = 16  # graphs per block code object before torch stops compiling it

# keyword arguments through which Hugging Face blocks receive a KV cache (the name differs between versions)
_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


class CompiledForward:
    """A block's forward compiled with ``torch.compile``, and the eager forward for calls with a KV cache."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.eager = type(block).forward.__get__(block)
        own = _inside_checkpointing(type(block).forward)
        self.checkpoints_outside = own is not None
        self.compiled = torch.compile(self.eager if own is None else own.__get__(block))
        self.block_name = type(block).__name__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _has_cache(args, kwargs):
            return self.eager(*args, **kwargs)
        try:
            block = self.block
            if (self.checkpoints_outside and block.gradient_checkpointing and block.training
                    and torch.is_grad_enabled()):  # what forward_with_checkpointing does, around the compiled code
                return block._gradient_checkpointing_func(partial(self.compiled, **kwargs), *args)
            return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RuntimeError(f"compile=True: torch.compile could not compile a {self.block_name} on this machine "
                               f"({first_line}). On the CPU it needs a C++ compiler, on a GPU Triton; install "
                               "them or set model.init_args.compile: false") from err


def _inside_checkpointing(forward: Any) -> Any:
    """The layer's own forward when ``forward`` is transformers' ``forward_with_checkpointing`` wrapper, else None."""
    code = getattr(forward, "__code__", None)  # functools.wraps gives the wrapper the layer's __name__, not its code
    if code is not None and code.co_name == "forward_with_checkpointing":
        return getattr(forward, "__wrapped__", None)
    return None


def _has_cache(args: tuple, kwargs: dict) -> bool:
    return (any(kwargs.get(name) is not None for name in _CACHE_ARGUMENTS)
            or any(isinstance(value, _Cache) for value in (*args, *kwargs.values())))


def compile_blocks(model: nn.Module, blocks_path: str | None = None) -> int:
    """Compile every transformer block of ``model`` in place (see the module docstring); returns how many.

    Call it once the model is complete (LoRA adapters and gradient checkpointing applied): a block compiled
    before is skipped, so calling it twice is harmless.
    """
    check_compile_available()
    quiet_compile_notices()
    # The blocks share one code object, whose cache holds the graphs of every block state (and in MAE those of the
    # encoder's and the decoder's blocks); past torch's default of 8 a block would silently run eagerly.
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), MIN_RECOMPILE_LIMIT))
    blocks = find_blocks(model, blocks_path).blocks
    for index, block in enumerate(blocks):
        current = block.__dict__.get("forward")
        if isinstance(current, CompiledForward):
            continue
        if current is not None:
            raise RuntimeError(f"Block {index} ({type(block).__name__}) already has an instance-level forward (a "
                               "wrapper such as ProgressiveLayerDrop's): compile the blocks before installing it")
        block.forward = CompiledForward(block)
    return len(blocks)


def compiled_forward(block: nn.Module) -> CompiledForward | None:
    """The block's :class:`CompiledForward` when :func:`compile_blocks` compiled it, else ``None``."""
    current = block.__dict__.get("forward")
    return current if isinstance(current, CompiledForward) else None


def check_compile_available() -> None:
    """Raise a ``RuntimeError`` saying what to do when this Python/platform has no ``torch.compile``."""
    if not torch._dynamo.is_dynamo_supported():
        raise RuntimeError("compile=True needs torch.compile, which this Python/platform does not support "
                           f"(torch {torch.__version__}); set model.init_args.compile: false")


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops torch's ``No CUDA runtime is found, using CUDA_HOME=...``: a CUDA build of torch logs it as a warning
    the first time inductor compiles on a machine without a GPU, where no CUDA runtime is expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def quiet_compile_notices() -> None:
    """Keep the console clean of third-party notices a CPU compile prints (installed once)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNotice) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNotice())


def check_compile_setting(value: Any) -> bool:
    """``value`` when it is a bool; a clear ``TypeError`` for anything else (``compile: "yes"``)."""
    if not isinstance(value, bool):
        raise TypeError(f"compile must be true or false (compile each transformer block with torch.compile), "
                        f"got {value!r}")
    return value
