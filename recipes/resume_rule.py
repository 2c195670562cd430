"""The resume rule for the run around the model: trainer settings, the seed and the callbacks.

A checkpoint written by ``python -m recipes fit`` carries the run's whole configuration (saved by
``recipes.cli.RunConfigSaver`` in the checkpoint's callback states). On resume it is compared with the new one:

* Refused (the run stops, naming each key with both values): a different training method. The method callbacks
  are those that change what is trained or how (:data:`METHOD_CALLBACKS`: LISA, OwLore, BAdam and every block
  switching policy, progressive layer drop, LLDS); adding, removing or replacing one changes the recipe, e.g.
  resuming an SFT checkpoint with OwLore's config.
* Listed (the value given now is used, every difference is printed in one message): every trainer setting
  (``max_steps``, ``accumulate_grad_batches``, ``gradient_clip_val``, ``precision``, ...), ``seed_everything``,
  the optimizer and scheduler sections, a method callback's settings (LISA's ``n_layers``, ``interval``,
  ``sampling``, ...) and the other callbacks (added, removed or changed).

A checkpoint without a saved configuration (written from Python) is checked for the method callbacks by the
callback states it holds.
"""

from __future__ import annotations

from typing import Any

import yaml

from callbacks.core.block_switching import BlockSwitching
from callbacks.layer_drop import ProgressiveLayerDrop
from callbacks.llds import LLDS
from recipes.checkpoints import import_class

METHOD_CALLBACKS: tuple[type, ...] = (BlockSwitching, ProgressiveLayerDrop, LLDS)
CONFIG_STATE = "RunConfigSaver"  # the callback state holding the run's configuration (YAML text)
_NOT_COMPARED = ("callbacks", "logger", "plugins", "default_root_dir")  # where logs go is not the run's content


def saved_config(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The run configuration saved in ``ckpt`` (``None`` when it holds none)."""
    text = (ckpt.get("callbacks") or {}).get(CONFIG_STATE, {}).get("config")
    return yaml.safe_load(text) if text else None


def _class(path: Any) -> type | None:
    try:
        return import_class(path) if isinstance(path, str) else None
    except ImportError:
        return None


def is_method(class_path: str) -> bool:
    """Whether the callback class at ``class_path`` is a training method (:data:`METHOD_CALLBACKS`)."""
    cls = _class(class_path)
    return cls is not None and issubclass(cls, METHOD_CALLBACKS)


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}"))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


def _diffs(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    return [f"{k}: checkpoint {saved.get(k)!r}, now {given.get(k)!r}" for k in sorted(saved.keys() | given.keys())
            if saved.get(k) != given.get(k)]


def _entries(callbacks: Any) -> list[tuple[str, dict[str, Any]]]:
    """``(class_path, init_args)`` of a config's ``trainer.callbacks`` (one entry or a list)."""
    if not callbacks:
        return []
    items = callbacks if isinstance(callbacks, list) else [callbacks]
    return [(c["class_path"], dict(c.get("init_args") or {})) for c in items if isinstance(c, dict) and
            "class_path" in c]


def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def compare_callbacks(saved: Any, given: Any) -> tuple[list[str], list[str]]:
    """``(refused, listed)`` differences between two ``trainer.callbacks`` configurations."""
    old, new = _entries(saved), _entries(given)
    methods_old = sorted(_short(p) for p, _ in old if is_method(p))
    methods_new = sorted(_short(p) for p, _ in new if is_method(p))
    refused = [] if methods_old == methods_new else [
        f"trainer.callbacks (the training method): checkpoint {methods_old or 'none'}, now {methods_new or 'none'}"]
    listed = []
    remaining = list(new)
    for path, args in old:
        match = next((entry for entry in remaining if entry[0] == path), None)
        if match is None:
            listed.append(f"trainer.callbacks: {path} is no longer given")
            continue
        remaining.remove(match)
        listed += _diffs(_flat(args, f"trainer.callbacks.{_short(path)}"),
                         _flat(match[1], f"trainer.callbacks.{_short(path)}"))
    listed += [f"trainer.callbacks: {path} is added" for path, _ in remaining]
    return refused, listed


def method_callbacks_in(ckpt: dict[str, Any]) -> list[str]:
    """Class names of the method callbacks whose state ``ckpt`` holds (for checkpoints without a saved config)."""
    names, todo = set(), list(METHOD_CALLBACKS)
    while todo:  # the method classes and all their subclasses
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return sorted({key.split("{", 1)[0] for key in (ckpt.get("callbacks") or {})} & names)


def compare_run(ckpt: dict[str, Any], given: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(refused, listed)`` differences of the run around the model: ``given`` is the new fit configuration
    (``trainer``, ``seed_everything``, ``optimizer``, ``lr_scheduler`` as plain dicts)."""
    saved = saved_config(ckpt)
    trainer = dict(given.get("trainer") or {})
    if saved is None:
        now = sorted(_short(p) for p, _ in _entries(trainer.get("callbacks")) if is_method(p))
        before = method_callbacks_in(ckpt)
        if before == now:
            return [], []
        return [f"trainer.callbacks (the training method): checkpoint {before or 'none'}, now {now or 'none'}"], []
    refused, listed = compare_callbacks((saved.get("trainer") or {}).get("callbacks"), trainer.get("callbacks"))
    old_trainer = {k: v for k, v in (saved.get("trainer") or {}).items() if k not in _NOT_COMPARED}
    new_trainer = {k: v for k, v in trainer.items() if k not in _NOT_COMPARED}
    listed += _diffs(_flat(old_trainer, "trainer"), _flat(new_trainer, "trainer"))
    for section in ("seed_everything", "optimizer", "lr_scheduler"):
        if section in saved or section in given:
            listed += _diffs(_flat(saved.get(section), section), _flat(given.get(section), section))
    return refused, listed
