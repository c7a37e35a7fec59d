"""The promotion gate: paired bootstrap decisions on constructed metrics, and the registry
round trip (a real MLflow sqlite store: versions, challenger/champion aliases)."""

from __future__ import annotations

import numpy as np
import pytest

from hymirec_udfs.evaluation.promotion import CHAMPION_MODEL, decide, metric_column, paired_interval

N = 400


def _users(seed: int = 0):
    rng = np.random.default_rng(seed)
    champion = rng.uniform(0.0, 0.5, N)
    history = rng.integers(5, 200, N)
    cold = np.arange(N) % 4 == 0
    return rng, champion, history, cold


def test_a_clear_win_is_promoted_with_its_interval() -> None:
    rng, champion, history, cold = _users()
    challenger = champion + 0.05 + rng.normal(0, 0.02, N)
    decision = decide(challenger, champion, history_len=history, target_cold=cold, metric="ndcg@10")
    assert decision.promote, decision.reason
    assert 0 < decision.overall.low < decision.overall.diff < decision.overall.high
    assert decision.overall.diff == pytest.approx(np.mean(challenger - champion))
    assert set(decision.segments) == {"short_history", "long_history", "cold_target"}
    summary = decision.summary()
    assert summary["promotion.promoted"] == 1 and summary["promotion.overall.users"] == N


def test_a_difference_within_noise_is_refused() -> None:
    rng, champion, history, cold = _users()
    noise = rng.normal(0, 0.1, N)
    challenger = champion + noise - noise.mean()  # equal on average, different per user
    decision = decide(challenger, champion, history_len=history, target_cold=cold, metric="ndcg@10")
    assert not decision.promote and "CI" in decision.reason
    assert decision.overall.low <= 0 <= decision.overall.high


def test_a_win_overall_that_regresses_on_cold_targets_is_refused() -> None:
    rng, champion, history, cold = _users()
    challenger = champion + 0.08
    challenger[cold] = champion[cold] - 0.05  # worse on every cold-target user
    decision = decide(challenger, champion, history_len=history, target_cold=cold, metric="ndcg@10")
    assert decision.overall.low > 0  # better on average ...
    assert not decision.promote and decision.reason == "regresses on cold_target"  # ... but not promoted


def test_too_few_users_refuses_and_small_segments_are_not_judged() -> None:
    _, champion, history, cold = _users()
    assert not decide(champion[:10] + 1, champion[:10], history_len=history[:10], target_cold=cold[:10],
                      metric="ndcg@10", min_users=30).promote
    few_cold = np.zeros(N, dtype=bool)
    few_cold[:3] = True
    decision = decide(champion + 0.05, champion, history_len=history, target_cold=few_cold, metric="ndcg@10")
    assert decision.promote and decision.segments["cold_target"] is None


def test_the_decision_is_reproducible_from_the_seed() -> None:
    rng, champion, _, _ = _users()
    challenger = champion + rng.normal(0.01, 0.1, N)
    a = paired_interval(challenger, champion, confidence=0.95, resamples=500, seed=3)
    b = paired_interval(challenger, champion, confidence=0.95, resamples=500, seed=3)
    assert a == b


def test_metric_setting_is_checked_naming_it() -> None:
    assert metric_column("ndcg@10", [10, 50]) == ("ndcg", 10)
    assert metric_column("recall@50", [10, 50]) == ("hit", 50)
    with pytest.raises(ValueError, match=r"registry.metric='mrr': use ndcg@K or recall@K"):
        metric_column("mrr", [10])
    with pytest.raises(ValueError, match=r"K in evaluate.ks=\[10\]"):
        metric_column("ndcg@20", [10])


# ---------------------------------------------------------------------------- registry


def _log_run(cfg) -> str:
    """A finished MLflow run holding a (tiny) logged model under ``model``."""
    import mlflow

    from hymirec_udfs.core.tracking import configure_mlflow

    class Constant(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):  # noqa: ARG002
            return model_input

    configure_mlflow(cfg)
    with mlflow.start_run() as run:
        mlflow.pyfunc.log_model(name="model", python_model=Constant())
    return run.info.run_id


def _tables(spark, store, scores: dict[tuple[str, str], np.ndarray]) -> None:
    """eval_per_user rows for (model, run_id) -> per-user ndcg@10, and matching sequences."""
    from hymirec_udfs.core import schemas

    rows = []
    for (model, run_id), values in scores.items():
        for u, value in enumerate(values):
            rows.append((model, run_id, "test", f"u{u:04d}", f"i{u % 50}", 1, True, {10: bool(value > 0.3)},
                         {10: float(value)}, None))
    store.overwrite(schemas.EVAL_PER_USER, spark.createDataFrame(rows, schemas.spark_schema(schemas.EVAL_PER_USER)))
    seqs = [(f"u{u:04d}", [f"i{(u + j) % 50}" for j in range(12)], list(range(12)), list(range(12)), 10, 11, 0)
            for u in range(N)]
    columns = schemas.spark_schema(schemas.SEQUENCES)
    store.overwrite(schemas.SEQUENCES, spark.createDataFrame(
        [dict(zip(["user_id", "item_ids", "timestamps", "source_orders", "train_end", "valid_end", "shard"], r))
         for r in seqs], columns))


def test_gate_registers_sets_aliases_and_moves_the_champion_only_on_a_win(spark, make_cfg) -> None:
    from hymirec_udfs.core import registry
    from hymirec_udfs.core.stage_api import StageContext
    from hymirec_udfs.core.tables import get_table_store
    from hymirec_udfs.core.tracking import RunLogger as Logger
    from hymirec_udfs.evaluation.promotion import run_gate

    cfg = make_cfg("registry.resamples=500", tracking=True)
    store = get_table_store(spark, cfg)
    ctx = StageContext(spark, cfg, store, "r", Logger(None), "evaluate")
    rng = np.random.default_rng(0)
    base = rng.uniform(0.0, 0.5, N)

    first = _log_run(cfg)
    out = run_gate(ctx, cfg, "hymirec", first, None)  # no champion yet: the first becomes it
    assert out["registry.version"] == "1" and out["promotion.promoted"] == 1
    assert registry.by_alias(cfg, registry.CHAMPION).run_id == first
    assert registry.by_alias(cfg, registry.CHALLENGER).run_id == first
    assert run_gate(ctx, cfg, "hymirec", first, registry.by_alias(cfg, registry.CHAMPION))["registry.version"] == "1"

    better = _log_run(cfg)
    _tables(spark, store, {("hymirec", better): base + 0.05, (CHAMPION_MODEL, first): base})
    out = run_gate(ctx, cfg, "hymirec", better, registry.by_alias(cfg, registry.CHAMPION))
    assert out["registry.version"] == "2" and out["promotion.promoted"] == 1, out
    assert out["promotion.overall.low"] > 0 and out["promotion.overall.users"] == N
    assert registry.by_alias(cfg, registry.CHAMPION).version == "2"

    worse = _log_run(cfg)
    _tables(spark, store, {("hymirec", worse): base - 0.02, (CHAMPION_MODEL, better): base})
    out = run_gate(ctx, cfg, "hymirec", worse, registry.by_alias(cfg, registry.CHAMPION))
    assert out["registry.version"] == "3" and out["promotion.promoted"] == 0, out
    assert out["registry.champion_version"] == "2"
    assert registry.by_alias(cfg, registry.CHALLENGER).version == "3"
    assert registry.by_alias(cfg, registry.CHAMPION).version == "2"  # unchanged


def test_missing_champion_alias_is_a_clear_error(make_cfg) -> None:
    from hymirec_udfs.core import registry

    cfg = make_cfg(tracking=True)
    assert registry.by_alias(cfg, registry.CHAMPION) is None
    with pytest.raises(registry.RegistryError, match="registered model 'hymirec' has no 'champion' alias"):
        registry.require_alias(cfg, registry.CHAMPION)
    with pytest.raises(registry.RegistryError, match="tracking.enabled is false"):
        registry.by_alias(make_cfg(), registry.CHAMPION)


def test_paired_users_are_this_evaluations_sample_not_earlier_rows(spark, make_cfg) -> None:
    # eval_per_user is merged by (model, run id, split, user): with evaluate.max_users the
    # rows of users an earlier, larger evaluation scored stay in the table and must not be
    # paired (nor averaged into the metrics) again.
    from hymirec_udfs.core import schemas
    from hymirec_udfs.core.stage_api import StageContext
    from hymirec_udfs.core.tables import get_table_store
    from hymirec_udfs.core.tracking import RunLogger as Logger
    from hymirec_udfs.evaluation.offline import sample_users
    from hymirec_udfs.evaluation.promotion import paired_metrics

    cfg = make_cfg(f"evaluate.max_users={N // 4}")
    store = get_table_store(spark, cfg)
    base = np.random.default_rng(1).uniform(0.0, 0.5, N)
    _tables(spark, store, {("hymirec", "new"): base + 0.05, (CHAMPION_MODEL, "old"): base})  # every user scored
    ctx = StageContext(spark, cfg, store, "r", Logger(None), "evaluate")
    paired = paired_metrics(ctx, cfg, "hymirec", "new", "old")
    sampled = sorted(r[0] for r in sample_users(store.read(schemas.SEQUENCES), N // 4).select("user_id").collect())
    assert 0 < len(sampled) < N // 2
    # user id order: each sampled user's own values, no one else's
    np.testing.assert_allclose(paired["champion"], [base[int(u[1:])] for u in sampled])
    np.testing.assert_allclose(paired["challenger"], [base[int(u[1:])] + 0.05 for u in sampled])
