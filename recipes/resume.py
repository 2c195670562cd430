"""Finding the checkpoint to resume from (``--ckpt_path last|auto``) and the rule for settings on resume.

Search: checkpoints (``*.ckpt``) anywhere under ``<default_root_dir>/<run name>/version_*/``, newest file first;
the first one that loads is used and the run continues in its version folder. Files that do not load are named
and skipped.

Resume rule: settings that define the model or the recipe must equal the checkpoint's, or the run stops naming
each differing key with both values. They are the module and data classes and the settings each class declares in
its ``defining_settings`` attribute (the architecture and sizes, the tokenizer); a class that declares none is
defined by its class alone; and, for ``fit``, the training method (the method callbacks: LISA, OwLore, BAdam,
layer drop, LLDS; see :mod:`recipes.resume_rule`). Every other setting (memory and speed switches such as
``gradient_checkpointing``, the schedule, every trainer setting such as ``max_steps`` or
``accumulate_grad_batches``, ``seed_everything``, a method callback's settings, the other callbacks) takes the
value given now; the ones that differ from the checkpoint are listed in one message.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipes.checkpoints import CheckpointError, import_class, load_checkpoint
from recipes.resume_rule import compare_run

_PRIVATE = ("_instantiator", "_class_path")


@dataclass
class ResumePlan:
    """What ``--ckpt_path`` resolved to: the file (or ``None`` to start fresh), the run version to continue in,
    and the messages to print."""

    path: str | None
    version: str | None = None
    notes: list[str] = field(default_factory=list)


def run_checkpoints(root: str | Path, name: str) -> list[Path]:
    """Every ``*.ckpt`` under ``<root>/<name>/version_*/``, newest first."""
    found = [p for p in (Path(root) / name).glob("version_*/**/*.ckpt") if p.is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def version_of(path: str | Path, root: str | Path, name: str) -> str | None:
    """The ``version_N`` folder of run ``name`` holding ``path``, or ``None`` when it lies elsewhere."""
    try:
        rel = Path(path).resolve().relative_to((Path(root) / name).resolve())
    except ValueError:
        return None
    return rel.parts[0] if len(rel.parts) > 1 and re.fullmatch(r"version_\d+", rel.parts[0]) else None


def resolve(ckpt_path: str | None, root: str | Path, name: str) -> tuple[ResumePlan, dict[str, Any] | None]:
    """Turn ``--ckpt_path`` (a file, ``last``, ``auto`` or ``None``) into a :class:`ResumePlan` and the loaded
    checkpoint. ``last`` needs a checkpoint; ``auto`` starts fresh when the run has none."""
    if ckpt_path is None:
        return ResumePlan(None), None
    if ckpt_path == "hpc" or str(ckpt_path).startswith("registry") or "://" in str(ckpt_path):
        return ResumePlan(str(ckpt_path)), None  # Lightning's own lookups and remote files: passed through as is
    if ckpt_path not in ("last", "auto"):
        ckpt = load_checkpoint(ckpt_path)
        return ResumePlan(str(ckpt_path), version_of(ckpt_path, root, name)), ckpt
    candidates = run_checkpoints(root, name)
    where = Path(root) / name
    if not candidates:
        if ckpt_path == "auto":
            return ResumePlan(None, notes=[f"--ckpt_path auto: no checkpoint under {where}/version_*, starting a "
                                           "new run"]), None
        raise CheckpointError(f"--ckpt_path last: no checkpoint under {where}/version_*; check --run_name and "
                              "trainer.default_root_dir, or use --ckpt_path auto to start fresh when there is none")
    skipped = []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as err:
            skipped.append(str(err))
            continue
        notes = [f"--ckpt_path {ckpt_path}: skipped {s}" for s in skipped]
        notes.append(f"--ckpt_path {ckpt_path}: resuming from {path} (step {ckpt.get('global_step')})"
                     + (", the newest checkpoint that loads" if skipped else ""))
        return ResumePlan(str(path), version_of(path, root, name), notes), ckpt
    raise CheckpointError(f"--ckpt_path {ckpt_path}: none of the {len(candidates)} checkpoints under {where} loads:\n"
                          + "\n".join(skipped))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(value) if isinstance(value, tuple) else value}


def _settings(hparams: dict[str, Any], init_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Top-level key -> value, ``class_path`` included, from checkpoint hparams or a CLI ``class_path/init_args``."""
    if init_args is not None:
        return {"class_path": hparams, **init_args}
    out = {k: v for k, v in hparams.items() if k not in _PRIVATE}
    if "_class_path" in hparams:
        out["class_path"] = hparams["_class_path"]
    return out


def defining_settings(*class_paths: Any) -> frozenset[str]:
    """``class_path`` and the ``defining_settings`` the classes named by ``class_paths`` declare (a checkpoint's
    class that no longer imports, or a class that declares none, adds nothing)."""
    out = {"class_path"}
    for path in class_paths:
        if not isinstance(path, str):
            continue
        try:
            cls = import_class(path)
        except ImportError:
            continue
        out |= getattr(cls, "defining_settings", frozenset())
    return frozenset(out)


def compare(saved: dict[str, Any], given: dict[str, Any], part: str) -> tuple[list[str], list[str]]:
    """``(defining differences, changeable differences)`` between the checkpoint's settings of ``part`` (``model``
    or ``data``) and the given ones, each as ``part.key: checkpoint X, now Y``. Keys missing on either side (an
    argument the class no longer has, or one not saved as a hyper-parameter) are not compared. The defining keys
    are those of both sides' classes (:func:`defining_settings`)."""
    defining_keys = defining_settings(saved.get("class_path"), given.get("class_path"))
    defining, changeable = [], []
    for key in sorted(saved.keys() & given.keys()):
        a, b = _flatten(saved[key], f"{key}."), _flatten(given[key], f"{key}.")
        diffs = [f"{part}.{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
                 if a.get(k) != b.get(k)]
        (defining if key in defining_keys else changeable).extend(diffs)
    return defining, changeable


def check_resume(ckpt: dict[str, Any], path: str, model: dict[str, Any], data: dict[str, Any] | None,
                 run: dict[str, Any] | None = None) -> list[str]:
    """Apply the resume rule. ``model`` / ``data``: the CLI's ``{"class_path", "init_args"}`` as plain dicts;
    ``run``: for ``fit``, the rest of the new configuration (``trainer`` with its callbacks, ``seed_everything``,
    ``optimizer``, ``lr_scheduler``), compared by :func:`recipes.resume_rule.compare_run`. Raises
    :class:`CheckpointError` on defining differences; returns the message for changed settings."""
    defining, changeable = compare(_settings(ckpt.get("hyper_parameters") or {}),
                                   _settings(model["class_path"], model.get("init_args") or {}), "model")
    if data is not None and ckpt.get("datamodule_hyper_parameters"):
        d, c = compare(_settings(ckpt["datamodule_hyper_parameters"]),
                       _settings(data["class_path"], data.get("init_args") or {}), "data")
        defining += d
        changeable += c
    if run is not None:
        d, c = compare_run(ckpt, run)
        defining += d
        changeable += c
    if defining:
        raise CheckpointError(f"Checkpoint {path} is of a different model or recipe; these settings must match to "
                              "resume:\n  " + "\n  ".join(defining)
                              + "\nUse the checkpoint's settings, or start a new run (a new --run_name).")
    if not changeable:
        return []
    return ["Resuming with settings changed since the checkpoint (the values given now are used):\n  "
            + "\n  ".join(changeable)]


def _plain(namespace: Any) -> dict[str, Any]:
    return namespace.as_dict() if hasattr(namespace, "as_dict") else dict(namespace)


def plan(config: Any, subcommand: str, run_name: str) -> ResumePlan:
    """Resolve the subcommand's ``ckpt_path`` in the parsed CLI ``config`` and apply the resume rule. Only ``fit``
    continues in the checkpoint's version folder; ``validate``/``test`` evaluate in a folder of their own."""
    root = config["trainer"].get("default_root_dir") or "runs"
    result, ckpt = resolve(config.get("ckpt_path"), root, run_name)
    if ckpt is not None:
        data = _plain(config["data"]) if config.get("data") else None
        model = _plain(config["model"])
        if subcommand != "fit":  # evaluation restores the weights: where training started from does not matter
            model["init_args"] = {k: v for k, v in (model.get("init_args") or {}).items()
                                  if k not in ("init_from", "sft_checkpoint")}
        result.notes += check_resume(ckpt, result.path, model, data,
                                     {k: _plain(config[k]) if hasattr(config[k], "as_dict") else config[k]
                                      for k in ("trainer", "seed_everything", "optimizer", "lr_scheduler")
                                      if k in config} if subcommand == "fit" else None)
    if subcommand != "fit":
        result.version = None
    return result


WEIGHT_SOURCES = ("model_path", "sft_checkpoint", "init_from")


def untrained_note(config: Any) -> str | None:
    """The warning for ``validate``/``test`` of a model whose weights come from nowhere (no ``--ckpt_path``, no
    pretrained ``model_path`` / ``sft_checkpoint`` / ``init_from``), else ``None``."""
    if config.get("ckpt_path"):
        return None
    init_args = config["model"].get("init_args") or {}
    if any(init_args.get(key) for key in WEIGHT_SOURCES):
        return None
    return ("UNTRAINED MODEL: no --ckpt_path and no pretrained weights (model_path / sft_checkpoint / init_from), "
            "so these metrics are of a randomly initialised model. The run folder is marked '-untrained'. Pass "
            "--ckpt_path PATH (or last) to evaluate a trained model.")


def resume_command(argv: list[str], ckpt_path: str, executable: str = "python") -> str:
    """The command line that resumes ``argv`` (the arguments after ``python -m recipes``) from ``ckpt_path``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            out.append(arg)
    return shlex.join([executable, "-m", "recipes", *out, "--ckpt_path", ckpt_path])
