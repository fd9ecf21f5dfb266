"""Size priors learned from saved labels set the probes that box probing tries."""

from pathlib import Path

import numpy as np
import pytest

from lib.spd.method import SPDPipeline, TrainedState
from lib.spd.method.box_probing import ProbeConfig, measure_anchor_boxes, probe_boxes
from lib.spd.method.size_prior import QUANTILES, SizePrior, learn_size_prior
from lib.spd.runtime import load_backbone
from lib.spd.serving import EmbeddingCache

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "spd_sam"


def bar(shape=(64, 64, 12), rows=(20, 30), cols=(10, 50), slices=(2, 9)) -> np.ndarray:
    """A box-shaped structure, 10 x 40 voxels in-plane on slices 2..8 along axis 2."""
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0]:rows[1], cols[0]:cols[1], slices[0]:slices[1]] = True
    return mask


def test_prior_holds_the_structures_size_and_shape_in_mm():
    prior = learn_size_prior([(bar(), (0.5, 1.0, 3.0))], axis=2)
    assert prior.slices == 7 and prior.axis == 2
    assert prior.half_mm == (20.0,) * len(QUANTILES), "half the larger side: 40 columns of 1 mm"
    assert prior.aspect == (0.125, 1.0), "5 mm of rows (10 at 0.5 mm) against 40 mm of columns"
    assert prior.volume_mm3 == bar().sum() * 1.5, "its volume in mm^3"
    legacy = {k: v for k, v in prior.to_json().items() if k != "volume_mm3"}
    assert SizePrior.from_json(legacy).volume_mm3 is None, "priors published before volumes were learned still load"
    assert learn_size_prior([(np.zeros((8, 8, 8), bool), (1, 1, 1))], axis=2) is None
    assert SizePrior.from_json(prior.to_json()) == prior


@pytest.mark.parametrize("bad", [{"half_mm": [1, 2], "aspect": [1, 1]}, {"half_mm": [1, 2, 3, 4, -5], "aspect": [1, 1]},
                                 {"half_mm": [1, 2, 3, 4, 5], "aspect": [1.5, 1]},
                                 {"half_mm": [1, 2, 3, 4], "aspect": [1, 1], "volume_mm3": 0}])
def test_a_malformed_prior_is_refused(bad):
    with pytest.raises(ValueError, match="size prior"):
        SizePrior.from_json({"axis": 2, "slices": 3, **bad})


def test_probes_follow_the_prior_and_box_probing_then_finds_a_long_thin_structure():
    prior = SizePrior(2, (8.0, 10.0, 12.0, 12.0), (0.25, 1.0), 20)
    config = prior.probes(ProbeConfig())
    assert config.half_sizes_mm == (9.0, 11.0, 13.0) and config.aspect == (0.25, 1.0)
    r0, c0, r1, c1 = probe_boxes((32.0, 32.0), np.array([1.0, 1.0]), (64, 64), config)[0]
    assert (r1 - r0, c1 - c0) == (4.5, 18.0)

    rr, cc = np.mgrid[:64, :64]
    structure = (abs(rr - 32) <= 2) & (abs(cc - 32) <= 10)  # 5 x 21 pixels
    neighbour = (abs(rr - 38) <= 3) & (abs(cc - 32) <= 10)  # just below it: SAM takes both into a square box

    def decode(slices, boxes):
        out = []
        for r0, c0, r1, c1 in boxes:
            inside = (rr >= r0) & (rr <= r1) & (cc >= c0) & (cc <= c1)
            both = structure | (neighbour if r1 >= 37 else np.zeros_like(structure))
            out.append(both & inside)
        return np.array(out)

    square = measure_anchor_boxes(decode, {0: (32.0, 32.0)}, (1.0, 1.0), (64, 64))[0]
    shaped = measure_anchor_boxes(decode, {0: (32.0, 32.0)}, (1.0, 1.0), (64, 64), config)[0]
    assert square[2] >= 41, "square probes grow over the neighbour"
    assert shaped[2] <= 36 and shaped[3] - shaped[1] >= 20, "probes of the structure's shape hold it alone"


def test_the_pipeline_uses_a_prior_only_for_its_label_and_axis():
    prior = SizePrior(2, (8.0, 10.0, 12.0, 12.0), (0.25, 1.0), 20)
    pipeline = SPDPipeline(load_backbone(cache_dir=str(APP_DIR / "model" / "runtime")), EmbeddingCache(1 << 20),
                           TrainedState(size_priors={"right_putamen": prior}))
    assert pipeline.probe_config("right_putamen", 2) == prior.probes(ProbeConfig())
    assert pipeline.probe_config("right_putamen", 1) == ProbeConfig() == pipeline.probe_config("left_putamen", 2)
