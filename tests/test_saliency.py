"""Appearance saliency's intensity model when many clicks drift off the structure."""

import numpy as np

from lib.spd.method.saliency import densest_half


def test_the_densest_half_of_click_intensities_stays_on_the_structure():
    """Eight clicks on the structure, four on its partial-volume edge, four on the fat around it: the median of all
    sixteen lies between tissue and edge, the densest half on the tissue, and its spread is the tissue's."""
    rng = np.random.default_rng(0)
    tissue, edge, fat = rng.uniform(0.47, 0.49, 8), rng.uniform(0.30, 0.40, 4), rng.uniform(0.17, 0.19, 4)
    values = rng.permutation(np.concatenate([tissue, edge, fat]))
    centre, spread = densest_half(values)
    assert tissue.min() <= centre <= tissue.max()
    assert np.median(values) < tissue.min() - 0.02  # control: the plain median is pulled off the tissue
    assert spread < 0.08 and (centre - fat.max()) / spread > 3.5  # fat lies far outside the model


def test_the_densest_half_of_one_normal_cluster_gives_its_mean_and_deviation():
    values = np.random.default_rng(1).normal(0.5, 0.1, 2000)
    centre, spread = densest_half(values)
    assert abs(centre - 0.5) < 0.02 and abs(spread - 0.1) < 0.015
