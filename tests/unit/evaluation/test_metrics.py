"""Unit tests for hymirec_udfs.metrics.

Expected ranks are worked out by hand in the comments from the tiny catalog below and
hard-coded; none is recomputed with the code under test.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np
import pytest
import torch

from hymirec_udfs.evaluation.metrics import metrics_from_ranks, per_user_metrics
from hymirec_udfs.evaluation.scoring import rank_targets, rank_targets_per_interest, topk_items

# Catalog in 2-D, deliberately not unit length (the functions normalise):
#   e0 = (2, 0)  -> (1, 0)
#   e1 = (0, 3)  -> (0, 1)
#   e2 = (3, 4)  -> (0.6, 0.8)
#   e3 = (-1, 0) -> (-1, 0)
ITEMS = np.array([[2.0, 0.0], [0.0, 3.0], [3.0, 4.0], [-1.0, 0.0]], dtype=np.float32)

# User A: interests (1, 0) and (0, 5) -> (0, 1).
#   cos with interest 1: e0 1,   e1 0,   e2 0.6,  e3 -1
#   cos with interest 2: e0 0,   e1 1,   e2 0.8,  e3 0
#   max:                 e0 1,   e1 1,   e2 0.8,  e3 0
# User B: interests (4, 3) -> (0.8, 0.6) and (0, -1).
#   cos with interest 1: e0 0.8, e1 0.6, e2 0.96, e3 -0.8
#   cos with interest 2: e0 0,   e1 -1,  e2 -0.8, e3 0
#   max:                 e0 0.8, e1 0.6, e2 0.96, e3 0
INTERESTS = np.array(
    [[[1.0, 0.0], [0.0, 5.0]], [[4.0, 3.0], [0.0, -1.0]]], dtype=np.float32
)

CHUNKINGS = [(1, 1), (1, 2), (2, 3), (65536, 1024)]


@pytest.mark.parametrize("chunk_items,chunk_users", CHUNKINGS)
def test_max_merge_hand_ranks(chunk_items: int, chunk_users: int) -> None:
    # A, target e2 (0.8): e0 (1) and e1 (1) beat it -> rank 3.
    # B, target e0 (0.8): only e2 (0.96) beats it -> rank 2.
    ranks = rank_targets(
        INTERESTS,
        ITEMS,
        np.array([2, 0]),
        chunk_items=chunk_items,
        chunk_users=chunk_users,
    )
    np.testing.assert_array_equal(ranks, [3, 2])
    assert ranks.dtype == np.int64


@pytest.mark.parametrize("chunk_items,chunk_users", CHUNKINGS)
def test_ties_count_against_the_target(chunk_items: int, chunk_users: int) -> None:
    # A, target e0 (1): e1 also scores exactly 1 -> tie counted against it -> rank 2.
    # B, target e3 (0): e0 0.8, e1 0.6, e2 0.96 all >= 0 -> rank 4.
    ranks = rank_targets(
        INTERESTS,
        ITEMS,
        np.array([0, 3]),
        chunk_items=chunk_items,
        chunk_users=chunk_users,
    )
    np.testing.assert_array_equal(ranks, [2, 4])


def test_constant_model_ranks_last() -> None:
    # Zero interests score 0 against every item: all 3 other items tie with the
    # target, so every target is ranked last (4 of 4), never first.
    zeros = np.zeros((2, 2, 2), dtype=np.float32)
    ranks = rank_targets(zeros, ITEMS, np.array([0, 2]))
    np.testing.assert_array_equal(ranks, [4, 4])
    metrics = metrics_from_ranks(ranks, ks=(1, 3))
    assert metrics["recall@1"] == 0.0
    assert metrics["recall@3"] == 0.0


@pytest.mark.parametrize("chunk_items,chunk_users", CHUNKINGS)
def test_excluded_history_never_counts(chunk_items: int, chunk_users: int) -> None:
    # A, target e2, history {e0}: only e1 (1) beats 0.8 -> rank 2.
    # B, target e0, history {e2, e3}: nothing left above 0.8 -> rank 1.
    ranks = rank_targets(
        INTERESTS,
        ITEMS,
        np.array([2, 0]),
        [np.array([0]), np.array([2, 3])],
        chunk_items=chunk_items,
        chunk_users=chunk_users,
    )
    np.testing.assert_array_equal(ranks, [2, 1])


def test_target_in_exclusion_is_still_ranked() -> None:
    # A, target e2, history {e2, e0}: e2 stays ranked, e0 is dropped, e1 (1) beats
    # 0.8 -> rank 2. B, target e0, history {e0} only -> e2 still beats it -> rank 2.
    ranks = rank_targets(
        INTERESTS,
        ITEMS,
        np.array([2, 0]),
        [np.array([2, 0]), np.array([0, 0])],
    )
    np.testing.assert_array_equal(ranks, [2, 2])


def test_absent_target_is_a_miss_and_counted() -> None:
    # A, target absent -> rank 0. B, target e2 (0.96, the best) -> rank 1.
    ranks = rank_targets(INTERESTS, ITEMS, np.array([-1, 2]))
    np.testing.assert_array_equal(ranks, [0, 1])
    metrics = metrics_from_ranks(ranks, ks=(1, 3))
    assert metrics["users"] == 2
    assert metrics["users_target_absent"] == 1
    # The absent target stays in the denominator as a miss.
    assert metrics["recall@1"] == pytest.approx(0.5)
    assert metrics["ndcg@3"] == pytest.approx(0.5)
    assert metrics["mrr"] == pytest.approx(0.5)


def test_all_targets_absent() -> None:
    ranks = rank_targets(INTERESTS, ITEMS, np.array([-1, -1]))
    np.testing.assert_array_equal(ranks, [0, 0])
    per_interest = rank_targets_per_interest(INTERESTS, ITEMS, np.array([-1, -1]))
    np.testing.assert_array_equal(per_interest, [[0, 0], [0, 0]])


@pytest.mark.parametrize("chunk_items,chunk_users", CHUNKINGS)
def test_union_versus_max(chunk_items: int, chunk_users: int) -> None:
    # A, target e2:
    #   interest 1 scores e0 1, e1 0, e2 0.6, e3 -1   -> e0 beats it -> rank 2
    #   interest 2 scores e0 0, e1 1, e2 0.8, e3 0    -> e1 beats it -> rank 2
    #   max merge (e0 1, e1 1 >= 0.8)                               -> rank 3
    # B, target e3:
    #   interest 1 scores e0 .8, e1 .6, e2 .96, e3 -.8 -> all beat it -> rank 4
    #   interest 2 scores e0 0, e1 -1, e2 -.8, e3 0   -> e0 ties     -> rank 2
    #   max merge (e0 .8, e1 .6, e2 .96 >= 0)                       -> rank 4
    targets = np.array([2, 3])
    kwargs = {"chunk_items": chunk_items, "chunk_users": chunk_users}
    per_interest = rank_targets_per_interest(INTERESTS, ITEMS, targets, **kwargs)
    np.testing.assert_array_equal(per_interest, [[2, 2], [4, 2]])
    union = rank_targets(INTERESTS, ITEMS, targets, merge="union", **kwargs)
    np.testing.assert_array_equal(union, [2, 2])
    best = rank_targets(INTERESTS, ITEMS, targets, merge="max", **kwargs)
    np.testing.assert_array_equal(best, [3, 4])
    # metrics accept the per-interest matrix and apply the union (min) rule.
    assert metrics_from_ranks(per_interest, ks=(2,))["recall@2"] == 1.0
    assert metrics_from_ranks(best, ks=(2,))["recall@2"] == 0.0


def test_union_with_exclusions() -> None:
    # A, target e2, history {e1}: interest 2 now has nothing above 0.8 -> rank 1;
    # interest 1 still has e0 -> rank 2.
    per_interest = rank_targets_per_interest(
        INTERESTS, ITEMS, np.array([2, -1]), [np.array([1]), np.array([], np.int64)]
    )
    np.testing.assert_array_equal(per_interest, [[2, 1], [0, 0]])


def test_two_dimensional_interests_mean_one_interest() -> None:
    # Single interest (1, 0): e0 1, e1 0, e2 0.6, e3 -1. Target e2 -> rank 2.
    ranks = rank_targets(np.array([[1.0, 0.0]]), ITEMS, np.array([2]))
    np.testing.assert_array_equal(ranks, [2])


def test_accepts_torch_tensors() -> None:
    ranks = rank_targets(
        torch.from_numpy(INTERESTS).requires_grad_(),
        torch.from_numpy(ITEMS).double(),
        torch.tensor([2, 0]),
    )
    np.testing.assert_array_equal(ranks, [3, 2])


def _copies_catalog(
    n_items: int, copy_idx: List[int], seed: int = 0
) -> Tuple[np.ndarray, np.ndarray]:
    """Random catalog where item 0 is the target and ``copy_idx`` hold scaled copies.

    The user's single interest is the target direction (score 1, the maximum), so no
    random item can beat it: the rank is 1 + the number of copies, which tie with
    the target up to rounding.
    """
    rng = np.random.default_rng(seed)
    items = rng.standard_normal((n_items, 64)).astype(np.float32)
    for idx, scale in zip(copy_idx, [3.0, 0.7, 2.0, 1.3, 0.1]):
        items[idx] = items[0] * np.float32(scale)
    interests = (items[0] * np.float32(5.0))[None, None, :]
    return interests, items


@pytest.mark.parametrize("n_items", [16, 3000])  # dense and sparse float64 re-checks
@pytest.mark.parametrize("chunk_items,chunk_users", [(7, 1), (65536, 1024)])
def test_rounding_level_ties_are_pessimistic(
    n_items: int, chunk_items: int, chunk_users: int
) -> None:
    # 4 scaled copies of the target -> 1 + 4 = rank 5, whatever the chunking.
    interests, items = _copies_catalog(n_items, [3, 5, 11, 14])
    ranks = rank_targets(
        interests,
        items,
        np.array([0]),
        chunk_items=chunk_items,
        chunk_users=chunk_users,
    )
    np.testing.assert_array_equal(ranks, [5])
    # Excluding two of the copies leaves 2 ties -> rank 3.
    ranks = rank_targets(
        interests,
        items,
        np.array([0]),
        [np.array([5, 14])],
        chunk_items=chunk_items,
        chunk_users=chunk_users,
    )
    np.testing.assert_array_equal(ranks, [3])


def test_chunking_invariance_random() -> None:
    rng = np.random.default_rng(7)
    n_users, n_items = 23, 157
    items = rng.standard_normal((n_items, 8)).astype(np.float32)
    items[40] = items[41]  # exact duplicates, so ties occur
    interests = rng.standard_normal((n_users, 3, 8)).astype(np.float32)
    targets = rng.integers(-1, n_items, n_users)
    targets[:3] = 41
    exclude = [rng.integers(0, n_items, rng.integers(0, 12)) for _ in range(n_users)]
    reference = rank_targets(interests, items, targets, exclude)
    reference_union = rank_targets_per_interest(interests, items, targets, exclude)
    for chunk_items, chunk_users in [(1, 1), (2, 2), (1, 5), (13, 4), (10**6, 10**6)]:
        kwargs = {"chunk_items": chunk_items, "chunk_users": chunk_users}
        np.testing.assert_array_equal(
            rank_targets(interests, items, targets, exclude, **kwargs), reference
        )
        np.testing.assert_array_equal(
            rank_targets_per_interest(interests, items, targets, exclude, **kwargs),
            reference_union,
        )
    assert np.all((reference >= 1) == (targets >= 0))


def test_ranks_agree_with_topk_positions() -> None:
    # Continuous random data has no ties, so the item at top-k position j must have
    # rank j + 1 when used as the target (two independent code paths).
    rng = np.random.default_rng(3)
    items = rng.standard_normal((300, 16)).astype(np.float32)
    interests = rng.standard_normal((5, 2, 16)).astype(np.float32)
    exclude = [rng.integers(0, 300, 10) for _ in range(5)]
    idx, _ = topk_items(interests, items, 20, exclude, chunk_items=37, chunk_users=2)
    for pos in (0, 7, 19):
        ranks = rank_targets(interests, items, idx[:, pos], exclude)
        np.testing.assert_array_equal(ranks, np.full(5, pos + 1))


@pytest.mark.parametrize("chunk_items,chunk_users", CHUNKINGS)
def test_topk_hand(chunk_items: int, chunk_users: int) -> None:
    kwargs = {"chunk_items": chunk_items, "chunk_users": chunk_users}
    # A with history {e1}: e0 (1), e2 (0.8), e3 (0).
    # B with no history: e2 (0.96), e0 (0.8), e1 (0.6).
    idx, scores = topk_items(
        INTERESTS, ITEMS, 3, [np.array([1]), np.array([], np.int64)], **kwargs
    )
    np.testing.assert_array_equal(idx, [[0, 2, 3], [2, 0, 1]])
    np.testing.assert_allclose(scores, [[1.0, 0.8, 0.0], [0.96, 0.8, 0.6]], atol=1e-6)
    assert idx.dtype == np.int64 and scores.dtype == np.float32


@pytest.mark.parametrize("order", ["random", "ascending"])
@pytest.mark.parametrize("chunk_items,chunk_users", [(7, 3), (64, 5), (1000, 64)])
def test_topk_matches_brute_force(order: str, chunk_items: int, chunk_users: int) -> None:
    """The threshold merge across chunks against a float64 brute force.

    "ascending" puts the best items last, so every chunk beats the running k-th best
    (the worst case of the merge); rows have different norms, one is zero, and histories
    are excluded.
    """
    rng = np.random.default_rng(11)
    items = rng.standard_normal((500, 12)) * rng.uniform(0.2, 3.0, (500, 1))
    items[17] = 0.0
    interests = rng.standard_normal((9, 3, 12))
    exclude = [rng.choice(500, rng.integers(0, 40), replace=False) for _ in range(9)]
    unit_items = items / np.maximum(np.linalg.norm(items, axis=1, keepdims=True), 1e-12)
    unit_int = interests / np.linalg.norm(interests, axis=2, keepdims=True)
    scores = np.einsum("usd,nd->usn", unit_int, unit_items).max(axis=1)
    if order == "ascending":
        perm = np.argsort(scores[0])  # user 0's best items at the end of the catalog
        items, unit_items, scores = items[perm], unit_items[perm], scores[:, perm]
        inverse = np.argsort(perm)
        exclude = [inverse[e] for e in exclude]
    for user, e in enumerate(exclude):
        scores[user, e] = -np.inf
    k = 25
    idx, got = topk_items(interests.astype(np.float32), items.astype(np.float32), k, exclude,
                          chunk_items=chunk_items, chunk_users=chunk_users)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.sort(idx, axis=1), np.sort(expected, axis=1))
    np.testing.assert_allclose(got, np.take_along_axis(scores, expected, axis=1), atol=2e-6)
    assert np.all(np.diff(got, axis=1) <= 0)


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


@pytest.mark.parametrize("device", DEVICES)
def test_topk_device_matches_default(device: str) -> None:
    """``device=`` (the GPU path of recommend/evaluate) gives the default path's lists.

    Rows of different norms and histories excluded; chunks small enough that the
    threshold merge and the exclusion masks run on the device. The device's IEEE
    float32 setting is restored afterwards.
    """
    rng = np.random.default_rng(5)
    items = (rng.standard_normal((800, 16)) * rng.uniform(0.5, 2.0, (800, 1))).astype(np.float32)
    interests = rng.standard_normal((37, 2, 16)).astype(np.float32)
    exclude = [rng.choice(800, rng.integers(0, 30), replace=False) for _ in range(37)]
    before = torch.backends.cuda.matmul.fp32_precision
    ref_idx, ref_score = topk_items(interests, items, 20, exclude, chunk_items=97, chunk_users=8)
    idx, score = topk_items(interests, items, 20, exclude, chunk_items=97, chunk_users=8, device=device)
    assert torch.backends.cuda.matmul.fp32_precision == before
    np.testing.assert_allclose(score, ref_score, atol=1e-5)
    agree = (idx == ref_idx).mean()
    assert agree > 0.99, agree  # near-ties may swap under another device's rounding
    for user, e in enumerate(exclude):
        assert not np.isin(idx[user], e).any()


def test_topk_pads_when_too_few_items() -> None:
    # B with history {e0, e1}: only e2 (0.96) and e3 (0) remain; k = 4 pads twice.
    idx, scores = topk_items(INTERESTS[1:], ITEMS, 4, [np.array([0, 1])])
    np.testing.assert_array_equal(idx, [[2, 3, -1, -1]])
    assert scores[0, 0] == pytest.approx(0.96)
    assert np.isneginf(scores[0, 2:]).all()


def test_topk_union_per_interest() -> None:
    # A: interest 1 best e0 (1) then e2 (0.6); interest 2 best e1 (1) then e2 (0.8).
    idx, scores = topk_items(INTERESTS[:1], ITEMS, 2, merge="union")
    assert idx.shape == (1, 2, 2)
    np.testing.assert_array_equal(idx, [[[0, 2], [1, 2]]])
    np.testing.assert_allclose(scores, [[[1.0, 0.6], [1.0, 0.8]]], atol=1e-6)


def test_metrics_from_ranks_hand_values() -> None:
    # ranks 1, 3, 0 (absent), 7 with K in {1, 3, 10}:
    #   recall@1 = 1/4, recall@3 = 2/4, recall@10 = 3/4
    #   ndcg: rank 1 -> 1, rank 3 -> 1/log2(4) = 0.5, rank 7 -> 1/log2(8) = 1/3
    #   ndcg@1 = 1/4, ndcg@3 = 1.5/4 = 0.375, ndcg@10 = (1 + 0.5 + 1/3)/4 = 11/24
    #   mrr = (1 + 1/3 + 0 + 1/7)/4 = 31/84
    metrics = metrics_from_ranks(np.array([1, 3, 0, 7]), ks=(1, 3, 10))
    expected = {
        "recall@1": 0.25,
        "recall@3": 0.5,
        "recall@10": 0.75,
        "ndcg@1": 0.25,
        "ndcg@3": 0.375,
        "ndcg@10": 11 / 24,
        "mrr": 31 / 84,
    }
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    assert metrics["users"] == 4
    assert metrics["users_target_absent"] == 1


def test_metrics_default_ks_and_empty() -> None:
    metrics = metrics_from_ranks(np.array([200, 201]))
    assert metrics["recall@200"] == 0.5
    assert metrics["recall@100"] == 0.0
    assert metrics["ndcg@200"] == pytest.approx(0.5 / math.log2(201))
    empty = metrics_from_ranks(np.zeros(0, dtype=np.int64), ks=(10,))
    assert empty == {
        "recall@10": 0.0,
        "ndcg@10": 0.0,
        "mrr": 0.0,
        "users": 0,
        "users_target_absent": 0,
    }


def test_per_user_metrics_columns() -> None:
    # rank 1 -> ndcg 1, rank 3 -> ndcg 0.5, rank 0 (absent) -> 0, rank 5 > K=3 -> 0.
    columns = per_user_metrics(np.array([1, 3, 0, 5]), ks=(3,))
    assert set(columns) == {"hit_3", "ndcg_3", "rr"}
    np.testing.assert_array_equal(columns["hit_3"], [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(columns["ndcg_3"], [1.0, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(columns["rr"], [1.0, 1 / 3, 0.0, 0.2])


def test_metrics_reject_bad_ranks() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        metrics_from_ranks(np.array([1, -2]))
    with pytest.raises(ValueError, match="whole numbers"):
        metrics_from_ranks(np.array([1.5]))
    with pytest.raises(ValueError, match="K must be"):
        metrics_from_ranks(np.array([1]), ks=(0,))
    with pytest.raises(ValueError, match="shape"):
        metrics_from_ranks(np.ones((2, 2, 2), dtype=np.int64))


def test_rank_targets_input_validation() -> None:
    targets = np.array([0, 1])
    with pytest.raises(ValueError, match="merge"):
        rank_targets(INTERESTS, ITEMS, targets, merge="mean")
    with pytest.raises(ValueError, match="dim"):
        rank_targets(INTERESTS, np.ones((4, 3), np.float32), targets)
    with pytest.raises(ValueError, match="out of range"):
        rank_targets(INTERESTS, ITEMS, np.array([0, 4]))
    with pytest.raises(ValueError, match="entries"):
        rank_targets(INTERESTS, ITEMS, np.array([0]))
    with pytest.raises(ValueError, match="exclude\\[1\\]"):
        rank_targets(INTERESTS, ITEMS, targets, [np.array([0]), np.array([9])])
    with pytest.raises(ValueError, match="exclude has"):
        rank_targets(INTERESTS, ITEMS, targets, [np.array([0])])
    with pytest.raises(ValueError, match="chunk"):
        rank_targets(INTERESTS, ITEMS, targets, chunk_items=0)
    bad_items = ITEMS.copy()
    bad_items[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf \(first rows: \[3\]\)"):
        rank_targets(INTERESTS, bad_items, targets)
    with pytest.raises(ValueError, match=r"first rows: \[3\]"):
        topk_items(INTERESTS, bad_items, 2)
    bad_interests = INTERESTS.copy()
    bad_interests[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN"):
        rank_targets(bad_interests, ITEMS, targets)
    with pytest.raises(ValueError, match="k must"):
        topk_items(INTERESTS, ITEMS, 0)


def test_reduced_precision_matmul_setting_is_overridden_and_restored() -> None:
    # With oneDNN allowed to run float32 matmuls in bfloat16, cosines are off by ~0.1,
    # which would silently reorder items; the functions must force IEEE float32 and
    # leave the caller's setting as they found it.
    knob = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if knob is None or not hasattr(knob, "fp32_precision"):
        pytest.skip("torch without backends.mkldnn.matmul.fp32_precision")
    rng = np.random.default_rng(11)
    items = rng.standard_normal((2000, 384)).astype(np.float32)
    interests = rng.standard_normal((16, 2, 384)).astype(np.float32)
    targets = rng.integers(0, 2000, 16)
    reference = rank_targets(interests, items, targets)
    reference_idx, _ = topk_items(interests, items, 50)
    saved = knob.fp32_precision
    try:
        knob.fp32_precision = "bf16"
        np.testing.assert_array_equal(
            rank_targets(interests, items, targets), reference
        )
        idx, _ = topk_items(interests, items, 50)
        np.testing.assert_array_equal(idx, reference_idx)
        assert knob.fp32_precision == "bf16"
    finally:
        knob.fp32_precision = saved
