"""Evaluation pieces: dot-product -> cosine reduction, per-user scoring against a brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hymirec_udfs.core.config import ModelConfig
from hymirec_udfs.evaluation.offline import mips_to_cosine, score_users
from hymirec_udfs.recommender.item_store import ItemStore
from hymirec_udfs.recommender.models import build_model


def test_mips_reduction_keeps_dot_product_order() -> None:
    rng = np.random.default_rng(0)
    items = rng.normal(size=(50, 8)) * rng.uniform(0.1, 3.0, size=(50, 1))
    user = rng.normal(size=8)
    aug = mips_to_cosine(items)
    np.testing.assert_allclose(np.linalg.norm(aug, axis=1), 1.0, atol=1e-5)
    u = np.append(user, 0.0)
    cos = aug @ u / np.linalg.norm(u)
    assert list(np.argsort(-cos)) == list(np.argsort(-(items @ user)))


class _Loaded:
    def __init__(self, model, store, max_long, max_recent):
        self.model, self.store, self.max_long, self.max_recent = model, store, max_long, max_recent


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    n, d = 30, 16
    emb = rng.normal(size=(n + 1, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[0] = 0
    centroids = rng.normal(size=(2, 4, d)).astype(np.float32)
    codes = rng.integers(0, 4, size=(n + 1, 2))
    coefs = rng.uniform(0.1, 1, size=(n + 1, 2)).astype(np.float32)
    codes[0], coefs[0] = 0, 0
    store = ItemStore([f"i{j}" for j in range(n)], emb, codes, coefs, centroids)
    cfg = ModelConfig(interests=2, coarse_queries=2, light_width=16, light_heads=2, light_layers=1,
                      llm_hidden=16, llm_layers=1, llm_heads=2, llm_kv_heads=2, llm_intermediate=32)
    model = build_model("hymirec", cfg, store, max_long=10, max_recent=5).eval()
    return _Loaded(model, store, 10, 5)


def test_score_users_matches_brute_force(loaded) -> None:
    long_ids = [["i1", "i2", "i3"], []]
    recent_ids = [["i4", "i5"], ["i6"]]
    targets = ["i7", "i8"]
    history = [["i1", "i2", "i3", "i4", "i5"], ["i6"]]
    out = score_users(loaded, long_ids, recent_ids, targets, history, exclude_history=True, merge="max",
                      ks=[1, 5, 10], chunk_items=7)
    # Independent brute force: max over interests of the cosine, history removed, ties against the target.
    with torch.inference_mode():
        def idx(rows, width):
            t = torch.zeros(len(rows), width, dtype=torch.long)
            for r, ids in enumerate(rows):
                v = [int(x[1:]) + 1 for x in ids]
                if v:
                    t[r, width - len(v):] = torch.tensor(v)
            return t
        interests = loaded.model(idx(long_ids, 10), idx(recent_ids, 5)).numpy()
    emb = loaded.store.embeddings[1:]
    for u in range(2):
        scores = (interests[u] @ emb.T).max(axis=0)
        t = int(targets[u][1:])
        hist = {int(x[1:]) for x in history[u]}
        others = [i for i in range(30) if i != t and i not in hist]
        expected = 1 + sum(scores[i] >= scores[t] for i in others)
        assert out["rank"][u] == expected
        assert out["hit_10"][u] == float(expected <= 10)
    assert np.all((out["diversity"] >= -1) & (out["diversity"] <= 1))


def test_absent_target_is_a_reported_miss(loaded) -> None:
    out = score_users(loaded, [[]], [["i1"]], ["not-in-catalog"], [["i1"]], exclude_history=True, merge="max",
                      ks=[10], chunk_items=64)
    assert out["rank"][0] == 0 and out["hit_10"][0] == 0.0 and out["ndcg_10"][0] == 0.0


def test_history_exclusion_switch_changes_ranks(loaded) -> None:
    hist = [[f"i{j}" for j in range(20)]]
    kwargs = dict(ks=[10], chunk_items=64, merge="max")
    with_ex = score_users(loaded, [[]], [["i1"]], ["i25"], hist, exclude_history=True, **kwargs)
    without = score_users(loaded, [[]], [["i1"]], ["i25"], hist, exclude_history=False, **kwargs)
    assert with_ex["rank"][0] <= without["rank"][0] and with_ex["rank"][0] <= 11


def test_user_sample_is_fixed_by_user_ids_and_grows_as_a_superset(spark) -> None:
    from hymirec_udfs.evaluation.offline import sample_users

    users = spark.createDataFrame([(f"u{i}", i) for i in range(4000)], "user_id string, n int")

    def ids(df) -> set:
        return {r[0] for r in df.select("user_id").collect()}

    assert sample_users(users, 0).count() == 4000  # 0: every user
    assert sample_users(users, 5000).count() == 4000  # more than there are
    small = ids(sample_users(users, 400))
    assert 320 <= len(small) <= 480  # about max_users: a per-user draw, not an exact count
    # the same users whatever the partitioning or row order
    assert ids(sample_users(users.repartition(7).orderBy("n", ascending=False), 400)) == small
    large = ids(sample_users(users, 1200))
    assert small < large and 1000 <= len(large) <= 1400


def test_negative_user_sample_is_refused(make_cfg) -> None:
    from hymirec_udfs.core.config import ConfigError

    with pytest.raises(ConfigError, match="evaluate.max_users"):
        make_cfg("evaluate.max_users=-1")
