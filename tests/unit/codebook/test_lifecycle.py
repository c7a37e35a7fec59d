"""Codebook lifecycle: alignment, drift score and the refit decision."""

from __future__ import annotations

import numpy as np
import torch

from hymirec_udfs.codebook import lifecycle
from hymirec_udfs.codebook.residual import ResidualCodebook, encode


def _book(seed: int, ks=(6, 4), d: int = 8) -> ResidualCodebook:
    g = torch.Generator().manual_seed(seed)
    return ResidualCodebook([torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1) for k in ks],
                            "cosine", d)


def test_align_recovers_a_permutation_and_keeps_reconstructions() -> None:
    old = _book(0)
    perms = [torch.randperm(c.shape[0], generator=torch.Generator().manual_seed(1)) for c in old.centroids]
    shuffled = ResidualCodebook([c[p] + 0.01 for c, p in zip(old.centroids, perms)], "cosine", 8)
    aligned, found = lifecycle.align(old, shuffled)
    for c_old, c_new, p, f in zip(old.centroids, aligned.centroids, perms, found):
        assert torch.allclose(torch.nn.functional.normalize(c_new, dim=1), torch.nn.functional.normalize(c_old + 0.01,
                                                                                                       dim=1), atol=1e-6)
        assert np.array_equal(p.numpy()[f], np.arange(len(f)))
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    _, _, r1 = encode(shuffled, x)
    _, _, r2 = encode(aligned, x)
    np.testing.assert_allclose(r1, r2, atol=1e-6)  # a relabelling: same reconstructions


def test_drift_score_and_codes_unchanged() -> None:
    assert lifecycle.drift_score(0.9, 0.9) == 0.0
    assert abs(lifecycle.drift_score(0.85, 0.9) - 0.5) < 1e-9  # 50 % more residual error
    assert lifecycle.drift_score(None, 0.9) is None
    same = lifecycle.codes_unchanged(np.array([[1, 2], [3, 4]]), np.array([[1, 2], [3, 5]]))
    assert same == {"all_layers": 0.5, "layer0": 1.0, "layer1": 0.5}


def test_decide_follows_the_policy() -> None:
    kw = dict(has_book=True, same_shape=True, threshold=0.5, min_new_items=20, days_since_fit=3, every_days=0)
    assert lifecycle.decide("auto", has_book=False, same_shape=False, drift=None, threshold=0.5, new_items=0,
                            min_new_items=20, days_since_fit=None, every_days=0).refit
    assert not lifecycle.decide("auto", drift=0.2, new_items=100, **kw).refit
    tripped = lifecycle.decide("auto", drift=0.6, new_items=100, **kw)
    assert tripped.refit and tripped.warm and tripped.reason.startswith("drift 0.600")
    assert not lifecycle.decide("auto", drift=3.0, new_items=5, **kw).refit  # too few to judge
    assert lifecycle.decide("auto", drift=0.0, new_items=100, **{**kw, "every_days": 3}).refit
    assert lifecycle.decide("always", drift=0.0, new_items=0, **kw).refit
    assert not lifecycle.decide("never", drift=9.0, new_items=1000, **kw).refit
    assert lifecycle.decide("never", drift=0.0, new_items=0, **{**kw, "same_shape": False}).refit
