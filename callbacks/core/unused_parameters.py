"""The strategy settings a callback needs when it leaves parameters without a gradient in some steps.

LISA, OwLore and BAdam freeze blocks and progressive layer dropping skips them, so in a given step some
parameters that DDP wrapped as trainable get no gradient. Plain ``DistributedDataParallel`` then fails at the
next step ("Expected to have finished reduction in the prior iteration ..."); it needs
``find_unused_parameters=True``. Lightning wraps the model after the callbacks' ``setup`` hook, so such a
callback calls :func:`allow_unused_parameters` there and ``--trainer.strategy ddp`` works as it is. FSDP needs
``use_orig_params=True`` (Lightning's default) so ``requires_grad`` may differ inside one flattened unit; a
strategy set otherwise stops the run before training with the one-line fix.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info


def allow_unused_parameters(trainer: L.Trainer, owner: str) -> None:
    """Make the trainer's strategy accept parameters without a gradient (call from a callback's ``setup``).

    Under DDP, ``find_unused_parameters`` is switched on (announced once) unless it already is; under FSDP with
    ``use_orig_params=False`` a ``ValueError`` names the fix. Other strategies need nothing.
    """
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy):
        kwargs = getattr(strategy, "_ddp_kwargs", None)  # what Lightning passes to DistributedDataParallel
        if not isinstance(kwargs, dict):
            raise RuntimeError(f"{owner} leaves blocks without gradients in some steps, and this Lightning version's "
                               "DDPStrategy cannot be adjusted: use --trainer.strategy ddp_find_unused_parameters_true")
        if not kwargs.get("find_unused_parameters"):
            kwargs["find_unused_parameters"] = True
            rank_zero_info(f"{owner}: DDP set to find_unused_parameters=True (blocks it freezes or skips have no "
                           "gradient in some steps)")
    elif isinstance(strategy, FSDPStrategy) and strategy.kwargs.get("use_orig_params") is False:
        raise ValueError(f"{owner} changes requires_grad inside FSDP units, which needs use_orig_params=True: "
                         "use FSDPStrategy(use_orig_params=True)")
