"""Training (SPEC §7): one supernet trained by a strategy, and the run it leaves behind.

======================  ==================================================================================
``config``              :class:`TrainConfig`, every knob of a run; round-trips to JSON, lives in checkpoints
``data``                data sets → :class:`DataSplits` (labelled, unlabelled, validation, test images)
``augment``             weak (α) and strong (𝒜) views of a whole batch at once (oracle: ``augment_reference``)
``loaders``             an epoch's batches and per-image augmentation seeds (shard-independent)
``plan``                :class:`StepPlan`: the members of one step and the role of each
``strategies``          ``tofa``, ``rss``, ``ps``, ``single``: a plan per step, phase changes per epoch
``losses``              the TOFA loss terms
``step``                plan + batch → member logits (one seam, ``--step``) → loss terms → backward
``trainer``             the loop: network, optimizer, schedule, selection index, checkpoints
``distributed``         torchrun: same subnets on every rank, one all-reduce per step
``selection``           the zero-cost selection index (TOFA Algorithm 2)
``selection_sidecar``   ``selection.json`` beside each checkpoint: ``tofa-fast select`` without torch
``run_record``          :class:`Run`: a trained run opened without data or optimizer (select, export, search)
``evaluation``          BN recalibration batches, test accuracy, calibrated extraction
``palette``             ``palette.json``, ``report.md``, ``pareto.png``
``checkpoint``          atomic writes, safe loading
``run``                 the CLI's entry points: train, select, export, evaluate
======================  ==================================================================================
"""

from .._lazy import lazy_attributes

# Imported on first use, so that `tofa-fast select` and the CLI's parser import no torch (tofa_fast/_lazy.py).
_EXPORTS = {
    "LOSS_VARIANTS": "config",
    "STRATEGIES": "config",
    "TrainConfig": "config",
    "DataSplits": "data",
    "load_data": "data",
    "Member": "plan",
    "StepPlan": "plan",
    "Run": "run_record",
    "SelectionIndex": "selection",
    "select_subnet": "selection",
    "Trainer": "trainer",
    "load_checkpoint": "checkpoint",
}
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
