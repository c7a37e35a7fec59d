"""Top-K retrieval: exact lists and attribution, the per-interest quota, faiss ANN recall."""

from __future__ import annotations

import numpy as np
import pytest

from hymirec_udfs.recommend.retrieval import AnnIndex, attribute_interests, exact_topk, round_robin


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((32, d))
    return _unit(centers[rng.integers(0, 32, n)] + 0.35 * rng.standard_normal((n, d)))


def test_exact_topk_is_the_brute_force_max_over_interests_with_history_excluded() -> None:
    rng = np.random.default_rng(0)
    items = _unit(rng.standard_normal((300, 8)))
    interests = _unit(rng.standard_normal((5, 3, 8)))
    exclude = [rng.choice(300, 10, replace=False) for _ in range(5)]
    idx, score, which = exact_topk(interests, items, 7, exclude, chunk_items=64)
    sims = np.einsum("usd,nd->usn", interests, items)
    best = sims.max(axis=1)
    for u in range(5):
        best[u, exclude[u]] = -np.inf
        expected = np.argsort(-best[u], kind="stable")[:7]
        assert set(idx[u]) == set(expected)
        np.testing.assert_allclose(score[u], best[u, idx[u]], atol=1e-6)
        np.testing.assert_array_equal(which[u], sims[u][:, idx[u]].argmax(axis=0))  # the interest that won
        assert not np.isin(idx[u], exclude[u]).any()


def test_quota_gives_every_interest_a_share_and_no_duplicates() -> None:
    rng = np.random.default_rng(1)
    items = _clustered(400, 16, 1)
    interests = _unit(rng.standard_normal((4, 2, 16)))
    interests[:, 1] = items[0]  # interest 1 sits on an item: without a quota it could take every slot
    idx, _, which = exact_topk(interests, items, 10, per_interest_quota=True)
    for u in range(4):
        assert len(set(idx[u])) == 10
        assert sorted(np.bincount(which[u], minlength=2)) == [5, 5]


def test_round_robin_skips_items_already_taken_and_pads() -> None:
    per_idx = np.array([[[3, 4, 5], [3, 6, -1]]])
    per_score = np.array([[[0.9, 0.8, 0.7], [0.95, 0.5, -np.inf]]], dtype=np.float32)
    idx, score, which = round_robin(per_idx, per_score, 5)
    assert idx.tolist() == [[3, 6, 4, 5, -1]]
    assert which.tolist() == [[0, 1, 0, 0, -1]]
    assert score[0, 1] == pytest.approx(0.5)


def test_attribution_marks_padding() -> None:
    items = np.eye(3, dtype=np.float32)
    interests = np.array([[[1, 0, 0], [0, 1, 0]]], dtype=np.float32)
    assert attribute_interests(interests, items, np.array([[1, 0, -1]])).tolist() == [[1, 0, -1]]


def test_ann_recall_at_100_against_exact_and_save_load(tmp_path) -> None:
    """The approximate option at its default settings keeps recall@100 >= 0.95."""
    items = _clustered(20_000, 32, 2)
    rng = np.random.default_rng(3)
    interests = _unit(items[rng.integers(0, 20_000, (50, 2))] + 0.2 * rng.standard_normal((50, 2, 32)))
    exclude = [rng.choice(20_000, 20, replace=False) for _ in range(50)]
    exact, _, _ = exact_topk(interests, items, 100, exclude)
    index = AnnIndex(items)
    approx, scores, which = index.topk(interests, 100, exclude)
    recall = np.mean([len(set(a) & set(e)) / 100 for a, e in zip(approx, exact)])
    assert recall >= 0.95, recall
    assert all(not np.isin(approx[u], exclude[u]).any() for u in range(50))
    assert np.all(np.diff(scores, axis=1) <= 1e-6) and set(np.unique(which)) <= {0, 1}
    index.save(str(tmp_path / "ann.faiss"))
    again = AnnIndex.load(str(tmp_path / "ann.faiss"))
    np.testing.assert_array_equal(again.topk(interests, 100, exclude)[0], approx)
