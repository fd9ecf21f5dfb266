"""Run an image encoder through ONNX Runtime: export once, cache the .onnx file, run on the CPU."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ..atomic_files import replacing

logger = logging.getLogger(__name__)

OPSET = 17


def cpu_cores() -> int:
    """Number of CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def onnx_path(cache_dir: Path, name: str, weights_id: str, image_size: int) -> Path:
    """Cache file of one encoder export, keyed by backbone, weights, input size, opset and torch version."""
    torch_version = torch.__version__.split("+")[0]
    return cache_dir / f"{name}_encoder_{weights_id}_{image_size}px_opset{OPSET}_torch{torch_version}.onnx"


def export_encoder(encoder: torch.nn.Module, image_size: int, target: Path) -> None:
    """Export `encoder` (input (1, 3, S, S) float32) to `target`, atomically (see `atomic_files.replacing`).

    The batch axis is fixed at 1: TinyViT reads the batch size with `len(x)`, which tracing freezes,
    and batching does not speed up the encoder on the CPU anyway.
    """
    example = torch.zeros(1, 3, image_size, image_size)
    with replacing(target) as tmp, warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder.eval(), (example,), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=["embedding"])


class OnnxEncoder:
    """Callable image encoder backed by an ONNX Runtime CPU session (graph optimisation level ALL)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or cpu_cores()
        options.log_severity_level = 3
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float32 -> (B, 256, 64, 64) float32 on the CPU, one image per session run."""
        batch = images.detach().cpu().float().numpy()
        outputs = [self.session.run(None, {self.input_name: batch[i:i + 1]})[0] for i in range(len(batch))]
        return torch.from_numpy(np.concatenate(outputs, axis=0))


def load_onnx_encoder(encoder: torch.nn.Module, name: str, weights_id: str, image_size: int,
                      cache_dir: Path) -> OnnxEncoder:
    """Return an ONNX Runtime encoder, exporting it into `cache_dir` first if no usable cached file exists."""
    path = onnx_path(cache_dir, name, weights_id, image_size)
    if path.exists():
        try:
            return OnnxEncoder(path)
        except Exception as exc:  # a damaged cache file: export again
            logger.warning("cached ONNX encoder %s is unusable (%s); exporting again", path, exc)
    logger.info("exporting %s image encoder to %s", name, path)
    export_encoder(encoder, image_size, path)
    return OnnxEncoder(path)
