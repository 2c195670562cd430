"""Hides packages the GPU machine lacks, for ``gpu_check.py --cpu-smoke`` (active only with ``HIDE_PACKAGES`` set).

``benchmarks/gpu_env`` is put first on ``PYTHONPATH`` of the smoke run's subprocesses; for every package named in
``HIDE_PACKAGES`` (comma-separated) imports fail and its distribution metadata is not found, as when it is not
installed, so a module that needs it fails the smoke run instead of the GPU run.
"""

import importlib.metadata
import importlib.util
import os
import sys

_HIDDEN = {name for name in os.environ.get("HIDE_PACKAGES", "").split(",") if name}


class _HiddenPackages:
    """A meta-path finder that reports the hidden packages as missing."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by benchmarks/gpu_env)", name=name)
        return None


def _without_hidden(function, missing):
    def wrapped(name, *args, **kwargs):
        if str(name).split(".")[0].replace("-", "_").lower() in _HIDDEN:
            return missing(name)
        return function(name, *args, **kwargs)

    return wrapped


def _not_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)


if _HIDDEN:
    sys.meta_path.insert(0, _HiddenPackages())
    importlib.util.find_spec = _without_hidden(importlib.util.find_spec, lambda name: None)
    importlib.metadata.version = _without_hidden(importlib.metadata.version, _not_installed)
    importlib.metadata.distribution = _without_hidden(importlib.metadata.distribution, _not_installed)
