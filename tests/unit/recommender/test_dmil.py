"""DMIL on hand-made tensors: clustering, matching, the loss value and its switches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from hymirec_udfs.core.config import DmilConfig
from hymirec_udfs.recommender.dmil import cluster_targets, count_distinct, dmil_loss, gather_negatives, hungarian_match, sample_negatives, select_targets


def _unit(*rows: tuple[float, ...]) -> torch.Tensor:
    t = torch.tensor(rows, dtype=torch.float32)
    return t / t.norm(dim=-1, keepdim=True)


# Clustering ------------------------------------------------------------------------------


def test_cluster_two_direction_groups() -> None:
    # Targets 0 and 2 point along x, targets 1 and 3 along y.
    targets = _unit((1, 0.1, 0), (0, 1, 0.1), (1, 0, 0.1), (0.1, 1, 0))[None]
    mask = torch.ones(1, 4, dtype=torch.bool)
    assign, centroids, n_groups = cluster_targets(targets, mask, s=2, iters=5)
    assert n_groups.tolist() == [2]
    assert assign.tolist() == [[0, 1, 0, 1]]  # farthest-point init starts from target 0
    # The normalised mean of (1,.1,0)/|.| and (1,0,.1)/|.| is (1,.05,.05)/|.|.
    expected0 = torch.tensor([1.0, 0.05, 0.05]) / math.sqrt(1 + 2 * 0.05**2)
    expected1 = torch.tensor([0.05, 1.0, 0.05]) / math.sqrt(1 + 2 * 0.05**2)
    torch.testing.assert_close(centroids[0, 0], expected0, atol=1e-6, rtol=0)
    torch.testing.assert_close(centroids[0, 1], expected1, atol=1e-6, rtol=0)


def test_cluster_groups_capped_by_distinct_targets_with_duplicates() -> None:
    a, b = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)
    targets = torch.stack([
        _unit(a, a, a, b),  # 2 distinct
        _unit(a, a, a, a),  # 1 distinct (the same item repeated)
        _unit(a, b, b, a),  # 2 distinct, but the b's are masked below
        _unit(a, b, (0, 0, 1.0), b),  # 3 distinct, s caps at 3
    ])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert count_distinct(targets, mask).tolist() == [2, 1, 1, 3]
    assign, centroids, n_groups = cluster_targets(targets, mask, s=3, iters=3)
    assert n_groups.tolist() == [2, 1, 1, 3]
    assert assign.tolist() == [[0, 0, 0, 1], [0, 0, 0, 0], [0, -1, -1, 0], [0, 1, 2, 1]]
    # Groups beyond s' are empty slots.
    assert centroids[0, 2].abs().sum() == 0
    assert centroids[1, 1:].abs().sum() == 0
    # s = 1 puts everything in one group whatever the targets.
    assign1, _, n1 = cluster_targets(targets, mask, s=1, iters=3)
    assert n1.tolist() == [1, 1, 1, 1]
    assert set(assign1[mask].tolist()) == {0}


def test_cluster_sample_without_targets() -> None:
    targets = torch.randn(2, 3, 4)
    mask = torch.tensor([[0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    assign, centroids, n_groups = cluster_targets(targets, mask, s=2, iters=2)
    assert n_groups.tolist() == [0, 2]
    assert assign[0].tolist() == [-1, -1, -1]
    assert centroids[0].abs().sum() == 0


# Matching --------------------------------------------------------------------------------


def _scipy_perm(r: torch.Tensor, c: torch.Tensor, n_groups: torch.Tensor) -> np.ndarray:
    r = torch.nn.functional.normalize(r, dim=-1)
    c = torch.nn.functional.normalize(c, dim=-1)
    sim = (r @ c.transpose(1, 2)).numpy()
    out = np.full(r.shape[:2], -1)
    for b, g in enumerate(n_groups.tolist()):
        if g:
            rows, cols = linear_sum_assignment(-sim[b, :, :g])  # minimise the negated cosine
            out[b, rows] = cols
    return out


@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_hungarian_matches_scipy_square_and_rectangular(s: int) -> None:
    gen = torch.Generator().manual_seed(s)
    bsz = 64
    interests = torch.randn(bsz, s, 6, generator=gen)
    centroids = torch.randn(bsz, s, 6, generator=gen)
    n_groups = torch.randint(0, s + 1, (bsz,), generator=gen)  # includes s' < s and s' = 0
    expected = _scipy_perm(interests, centroids, n_groups)
    for method in ("brute", "scipy", "auto"):
        perm = hungarian_match(interests, centroids, n_groups, method=method)
        np.testing.assert_array_equal(perm.numpy(), expected, err_msg=method)
    # Each real group is matched exactly once; interests beyond s' stay unmatched.
    perm = hungarian_match(interests, centroids, n_groups)
    for b in range(bsz):
        assert sorted(x for x in perm[b].tolist() if x >= 0) == list(range(int(n_groups[b])))


def test_hungarian_hand_case_beats_greedy() -> None:
    # Greedy takes the best pair first (r0-g0, .8) and leaves r1 with g1 (-.71); the
    # optimum is the other permutation.
    interests = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    g0 = torch.tensor([0.8, 0.6])  # cos with r0 = .8, with r1 = .6
    g1 = torch.tensor([0.7, -math.sqrt(1 - 0.49)])  # cos with r0 = .7, with r1 = -.71
    centroids = torch.stack([g0, g1])[None]
    perm = hungarian_match(interests, centroids, torch.tensor([2]))
    # r0->g0, r1->g1: .8 - .71 = .09; r0->g1, r1->g0: .7 + .6 = 1.3 (optimal).
    assert perm.tolist() == [[1, 0]]


# Loss ------------------------------------------------------------------------------------


def _hand_case() -> dict[str, torch.Tensor]:
    a = 0.3
    return {
        "interests": torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]),  # r1 = x, r2 = y
        "targets": torch.tensor([[[math.cos(a), math.sin(a)], [-0.2, 1.0]]]),  # t1 ~ x, t2 ~ y
        "mask": torch.tensor([[True, True]]),
        "target_ids": torch.tensor([[5, 7]]),
        "neg": torch.tensor([[-1.0, 0.0], [0.6, 0.8]]),  # e1, e2 (unit)
        "neg_ids": torch.tensor([3, 9]),
    }


def test_dmil_loss_equals_hand_computation() -> None:
    c = _hand_case()
    tau = 0.5
    loss, info = dmil_loss(
        c["interests"], c["targets"], c["mask"], c["target_ids"], c["neg"], c["neg_ids"],
        s=2, matching="hungarian", temperature=tau, cluster_iters=3,
    )
    # Two distinct targets -> two singleton groups; t1 -> r1, t2 -> r2.
    cos_t1_r1 = math.cos(0.3)
    cos_t2_r2 = 1.0 / math.sqrt(1.04)
    # cos(r1, e1) = -1, cos(r1, e2) = .6; cos(r2, e1) = 0, cos(r2, e2) = .8
    l1 = -math.log(math.exp(cos_t1_r1 / tau) / (math.exp(cos_t1_r1 / tau) + math.exp(-1 / tau) + math.exp(0.6 / tau)))
    l2 = -math.log(math.exp(cos_t2_r2 / tau) / (math.exp(cos_t2_r2 / tau) + math.exp(0 / tau) + math.exp(0.8 / tau)))
    assert loss.item() == pytest.approx((l1 + l2) / 2, rel=1e-5)
    assert info["interest_of_target"].tolist() == [[0, 1]]
    assert info["n_groups_mean"] == 2.0


def test_negatives_equal_to_a_positive_are_masked() -> None:
    c = _hand_case()
    tau = 0.5
    neg_ids = torch.tensor([3, 7])  # e2 is now the item of target t2
    kwargs = dict(s=2, temperature=tau, cluster_iters=3)
    masked, _ = dmil_loss(c["interests"], c["targets"], c["mask"], c["target_ids"], c["neg"], neg_ids, **kwargs)
    unmasked, _ = dmil_loss(c["interests"], c["targets"], c["mask"], c["target_ids"], c["neg"], neg_ids,
                            mask_positive_negatives=False, **kwargs)
    # e2 leaves the denominator of BOTH targets (it is a positive of the sample).
    cos_t1_r1 = math.cos(0.3)
    cos_t2_r2 = 1.0 / math.sqrt(1.04)
    l1 = -math.log(math.exp(cos_t1_r1 / tau) / (math.exp(cos_t1_r1 / tau) + math.exp(-1 / tau)))
    l2 = -math.log(math.exp(cos_t2_r2 / tau) / (math.exp(cos_t2_r2 / tau) + math.exp(0 / tau)))
    assert masked.item() == pytest.approx((l1 + l2) / 2, rel=1e-5)
    assert unmasked.item() > masked.item() + 0.1
    # A masked (padding) target never masks a negative.
    mask = torch.tensor([[True, False]])
    ids = torch.tensor([[5, 3]])
    only_t1, _ = dmil_loss(c["interests"], c["targets"], mask, ids, c["neg"], c["neg_ids"], **kwargs)
    l1_all = -math.log(math.exp(cos_t1_r1 / tau) / (math.exp(cos_t1_r1 / tau) + math.exp(-1 / tau) + math.exp(0.6 / tau)))
    assert only_t1.item() == pytest.approx(l1_all, rel=1e-5)


def test_max_matching_assigns_by_argmax_unlike_hungarian() -> None:
    interests = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    targets = _unit((1.0, 0.1), (0.9, 0.44))[None]  # both closest to r1
    mask = torch.ones(1, 2, dtype=torch.bool)
    ids = torch.tensor([[1, 2]])
    neg, neg_ids = torch.tensor([[-1.0, 0.0]]), torch.tensor([3])
    _, info_h = dmil_loss(interests, targets, mask, ids, neg, neg_ids, matching="hungarian")
    _, info_m = dmil_loss(interests, targets, mask, ids, neg, neg_ids, matching="max")
    # Hungarian: cos(r1,t1)+cos(r2,t2) = .995+.439 beats .898+.0995, so t2 goes to r2.
    assert info_h["interest_of_target"].tolist() == [[0, 1]]
    assert info_m["interest_of_target"].tolist() == [[0, 0]]


def test_single_target_goes_to_best_interest() -> None:
    # "Without window targets": w = 1, s = 2 -> s' = 1 and the one group takes the
    # interest most similar to it, the other interest gets no loss.
    interests = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    targets = _unit((0.2, 1.0), (1.0, 0.3))[:, None, :]
    mask = torch.ones(2, 1, dtype=torch.bool)
    _, info = dmil_loss(interests, targets, mask, torch.tensor([[1], [2]]), torch.tensor([[-1.0, 0.0]]),
                        torch.tensor([3]), s=2)
    assert info["interest_of_target"].tolist() == [[1], [0]]
    assert info["perm"].tolist() == [[-1, 0], [0, -1]]
    assert info["matched_fraction"] == 0.5


def test_learnable_logit_scale_is_clamped_and_differentiable() -> None:
    c = _hand_case()
    scale = torch.tensor(math.log(1 / 0.5), requires_grad=True)
    loss, _ = dmil_loss(c["interests"], c["targets"], c["mask"], c["target_ids"], c["neg"], c["neg_ids"],
                        logit_scale=scale)
    fixed, _ = dmil_loss(c["interests"], c["targets"], c["mask"], c["target_ids"], c["neg"], c["neg_ids"],
                         temperature=0.5)
    assert loss.item() == pytest.approx(fixed.item(), rel=1e-5)
    loss.backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)
    huge, _ = dmil_loss(c["interests"], c["targets"], c["mask"], c["target_ids"], c["neg"], c["neg_ids"],
                        logit_scale=torch.tensor(20.0))
    at_cap, _ = dmil_loss(c["interests"], c["targets"], c["mask"], c["target_ids"], c["neg"], c["neg_ids"],
                          temperature=0.01)  # 1/tau = 100 = the cap
    assert huge.item() == pytest.approx(at_cap.item(), rel=1e-5)


def test_loss_gradient_reaches_only_matched_interest() -> None:
    interests = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], requires_grad=True)
    targets = _unit((1.0, 0.2))[None]
    loss, _ = dmil_loss(interests, targets, torch.ones(1, 1, dtype=torch.bool), torch.tensor([[1]]),
                        torch.tensor([[-1.0, 0.0]]), torch.tensor([2]), s=2, temperature=1.0)
    loss.backward()
    assert interests.grad[0, 0].abs().sum() > 0
    assert interests.grad[0, 1].abs().sum() == 0


def test_select_targets_ablations() -> None:
    idx = torch.tensor([[4, 5, 6], [7, 0, 0]])
    mask = idx != 0
    full = select_targets(idx, mask, DmilConfig())
    assert full[0].shape == (2, 3)
    for cfg in (DmilConfig(enabled=False), DmilConfig(window_targets=False)):
        cut_idx, cut_mask = select_targets(idx, mask, cfg)
        assert cut_idx.tolist() == [[4], [7]]
        assert cut_mask.tolist() == [[True], [True]]


def test_sample_negatives_uniform_over_catalog_and_reproducible() -> None:
    ids = sample_negatives(5, 5000, torch.Generator().manual_seed(0))
    assert ids.min() == 1 and ids.max() == 5
    counts = torch.bincount(ids, minlength=6)[1:].float()
    assert (counts / 5000 - 0.2).abs().max() < 0.03
    again = sample_negatives(5, 5000, torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)
    assert torch.equal(gather_negatives(ids), ids)  # no process group: unchanged
    with pytest.raises(ValueError):
        sample_negatives(0, 3)
