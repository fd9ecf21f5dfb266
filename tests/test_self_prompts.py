"""Self-prompting: confident regions of a trained saliency volume become clicks on the structure."""

import numpy as np

from lib.spd.method.self_prompts import SelfPromptConfig, self_prompts


def saliency_scene():
    """(slices, rows, cols) maps along axis 2 of a (40, 50, 30) volume: an ellipsoid structure (0.9) on slices 8..22
    and a small confident speck (0.95) elsewhere."""
    k, i, j = np.mgrid[:30, :40, :50]
    maps = np.full((30, 40, 50), 0.05, dtype=np.float32)
    maps[((k - 15) / 7.5) ** 2 + ((i - 20) / 8) ** 2 + ((j - 30) / 6) ** 2 <= 1] = 0.9
    maps[2:4, 5:7, 5:7] = 0.95
    return maps


def test_clicks_lie_inside_the_structure_every_few_slices_through_its_middle():
    maps = saliency_scene()
    prompts = self_prompts(maps, axis=2, spacing=(1.0, 1.0, 2.0), config=SelfPromptConfig(every=3))
    assert prompts is not None and abs(prompts.confidence - 0.9) < 1e-6
    slices = [c.ijk[2] for c in prompts.clicks]
    assert 15 in slices and np.all(np.diff(slices) == 3), slices
    assert min(slices) <= 10 and max(slices) >= 20, "clicks span the structure"
    for c in prompts.clicks:
        i, j, k = c.ijk
        assert c.positive and maps[k, i, j] == np.float32(0.9), "on the structure, not the speck"


def test_a_structure_that_is_not_there_gets_no_clicks():
    maps = np.full((30, 40, 50), 0.05, dtype=np.float32)
    assert self_prompts(maps, 2, (1.0, 1.0, 2.0)) is None, "nothing confident"
    maps[2:4, 5:7, 5:7] = 0.95  # 8 voxels of 2 mm^3: 16 mm^3, below the 100 mm^3 floor
    assert self_prompts(maps, 2, (1.0, 1.0, 2.0)) is None, "a confident speck is not a structure"


def test_clicks_are_voxel_indices_of_the_axis_the_maps_run_along():
    maps = saliency_scene()  # (slices, rows, cols); along axis 0 rows are j and cols are k
    prompts = self_prompts(maps, axis=0, spacing=(2.0, 1.0, 1.0))
    for c in prompts.clicks:
        i, j, k = c.ijk
        assert maps[i, j, k] == np.float32(0.9)


def test_a_component_far_smaller_than_the_labelled_structure_is_not_it():
    maps = saliency_scene()  # the ellipsoid holds about 1,900 voxels of 2 mm^3
    assert self_prompts(maps, 2, (1.0, 1.0, 2.0), expected_mm3=4000.0) is not None
    assert self_prompts(maps, 2, (1.0, 1.0, 2.0), expected_mm3=40000.0) is None, "under a quarter of its volume"
