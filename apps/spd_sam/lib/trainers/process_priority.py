"""A training round in MONAI Label's background train process leaves a core to interactive requests.

MONAI Label runs ``POST /train`` in a subprocess (``python -m monailabel.interfaces.utils.app -m train``);
on a CPU server that process would otherwise run torch on every core while annotators wait for their
infers. In that process (never in the server itself, which ``run_sync=true`` trains in) the round runs
torch on all cores but one. Its scheduling priority is left as it is: a lowered one (niceness 10) was
tried and starved the round whenever the server embedded in the background, so that a time-bounded
round did next to nothing.
"""

from __future__ import annotations

import logging
import sys

import torch

from lib.spd.runtime.onnx_encoder import cpu_cores

logger = logging.getLogger(__name__)

TRAIN_PROCESS_MODULE = "monailabel.interfaces.utils.app"  # what MONAI Label runs with ``python -m`` for a train task


def in_train_process() -> bool:
    """Whether this process is MONAI Label's background train subprocess."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name == TRAIN_PROCESS_MODULE


def yield_to_requests() -> bool:
    """In the train subprocess: torch threads for all cores but one. Returns whether it applied (False in the
    server process, which it leaves alone)."""
    if not in_train_process():
        return False
    cores = cpu_cores()
    torch.set_num_threads(max(1, cores - 1))
    logger.info("training process: %d torch threads of %d cores (one left to interactive requests)",
                torch.get_num_threads(), cores)
    return True
