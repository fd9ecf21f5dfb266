"""A training round in MONAI Label's background train process gives the CPU to interactive requests first.

MONAI Label runs ``POST /train`` in a subprocess (``python -m monailabel.interfaces.utils.app -m train``);
on a CPU server that process would otherwise take every core while annotators wait for their infers.
In that process (never in the server itself, which ``run_sync=true`` trains in) the round lowers its
scheduling priority to niceness 10, so the kernel gives the server about ten times its share of a
contended core, and leaves one core free of torch's intra-op threads.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

logger = logging.getLogger(__name__)

TRAIN_PROCESS_MODULE = "monailabel.interfaces.utils.app"  # what MONAI Label runs with ``python -m`` for a train task
TRAINING_NICENESS = 10


def in_train_process() -> bool:
    """Whether this process is MONAI Label's background train subprocess."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name == TRAIN_PROCESS_MODULE


def yield_to_requests() -> bool:
    """In the train subprocess: niceness ``TRAINING_NICENESS`` and torch threads for all cores but one.
    Returns whether it applied (False in the server process, which it leaves alone)."""
    if not in_train_process():
        return False
    niceness = os.nice(0)
    if niceness < TRAINING_NICENESS:
        niceness = os.nice(TRAINING_NICENESS - niceness)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores - 1))
    logger.info("training process: niceness %d, %d torch threads of %d cores (interactive requests come first)",
                niceness, torch.get_num_threads(), cores)
    return True
