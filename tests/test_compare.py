"""`python -m training compare`: the paired lesion-level bootstrap that decides whether a
candidate's validation edge over the shipped model is more than noise."""

from __future__ import annotations

import numpy as np

from training.compare import paired_bootstrap
from training.metrics import headline, selection_score


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 400)
    groups = np.repeat(np.arange(200), 2)  # two images per lesion
    noisy = rng.dirichlet(np.ones(4), 400)
    return y, groups, noisy


def test_a_clearly_better_candidate_wins_every_resample():
    y, groups, base = _data()
    better = 0.5 * base + 0.5 * np.eye(4)[y]
    got = paired_bootstrap(y, groups, base, better, [2, 3], n_boot=200)
    assert got["difference"] > 0.1 and got["ci95"][0] > 0 and got["better_share"] == 1.0
    assert got["score"] == round(selection_score(headline(y, better, [2, 3])), 4)
    assert got["baseline"] == round(selection_score(headline(y, base, [2, 3])), 4)


def test_the_same_model_is_no_better_and_noise_straddles_zero():
    y, groups, base = _data()
    same = paired_bootstrap(y, groups, base, base.copy(), [2, 3], n_boot=100)
    assert same["difference"] == 0 and same["ci95"] == [0, 0] and same["better_share"] == 0
    # Another model of the same (no) skill: its interval holds zero.
    _, _, other = _data(seed=1)
    coin = paired_bootstrap(y, groups, base, other, [2, 3], n_boot=300)
    assert coin["ci95"][0] < 0 < coin["ci95"][1]
    assert 0.02 < coin["better_share"] < 0.98


def test_resamples_keep_a_lesion_s_images_together():
    """Two images of one lesion are drawn together: a candidate that only differs on one
    lesion changes the difference in whole-lesion steps."""
    y, groups, base = _data()
    cand = base.copy()
    cand[0:2] = np.eye(4)[y[0:2]]  # right on both images of lesion 0 only
    got = paired_bootstrap(y, groups, base, cand, [2, 3], n_boot=300, seed=4)
    assert got["better_share"] < 1.0  # resamples without lesion 0 see no difference
