"""fit_codebook / encode_items through local Spark and Delta: outputs, variants, bad input."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from hymirec_udfs.core import schemas
from hymirec_udfs.codebook.spark import decode_item_codes
from hymirec_udfs.artifacts import latest_codebook
from hymirec_udfs.core.stage_api import StageContext, StageFailed
from hymirec_udfs.pipeline import run_stage
from hymirec_udfs.core.tables import get_table_store
from hymirec_udfs.core.tracking import RunLogger

pytestmark = pytest.mark.spark
NOW = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, d))
    x = centers[rng.integers(0, 8, n)] + 0.3 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write_embeddings(spark, cfg, matrix: np.ndarray, tag: str = "") -> str:
    """Items i0.. with content hashes h<j><tag> (a new tag: every item's content changed)."""
    from hymirec_udfs.artifacts import current_model_id

    model_id = current_model_id(cfg.embed)
    rows = [(f"i{j}", [float(v) for v in vec], len(vec), model_id, f"h{j}{tag}", NOW) for j, vec in enumerate(matrix)]
    store = get_table_store(spark, cfg)
    store.overwrite(schemas.ITEM_EMBEDDINGS, spark.createDataFrame(rows, schemas.spark_schema(schemas.ITEM_EMBEDDINGS)))
    return model_id


@pytest.fixture
def cb_cfg(make_cfg, tiny_llama_dir):
    def _make(*extra: str, tracking: bool = False):
        return make_cfg(f"embed.model={tiny_llama_dir}", "codebook.ks=[8, 8]", "codebook.iters=10", *extra,
                        tracking=tracking)
    return _make


def test_fit_and_encode_cosine(spark, cb_cfg) -> None:
    cfg = cb_cfg()
    matrix = _clustered(240, 16)
    _write_embeddings(spark, cfg, matrix)
    fit = run_stage(spark, cfg, "fit-codebook")
    assert fit.row_counts == {"basepool": 240, "centroids": 16, "catalog": 240, "new_items": 240,
                              "committed.codebooks": 16, "committed.codebook_health": 1}
    assert fit.summary["refit"] and fit.summary["reason"] == "no codebook for the current embedding model"
    # Balanced at fit time: every cluster holds at most ceil(240 / 8) = 30 items.
    assert fit.summary["fit_layer0_cluster_size_max"] <= 30 and fit.summary["fit_layer1_cluster_size_max"] <= 30
    enc = run_stage(spark, cfg, "encode")
    assert enc.row_counts == {"items": 240, "encoded": 240, "committed.item_codes": 240}
    store = get_table_store(spark, cfg)
    codes = store.read(schemas.ITEM_CODES)
    row = codes.first()
    assert len(row.codes) == 2 and len(row.coefs) == 2 and row.codebook_version == fit.summary["version"]
    assert all(np.float16(c) == c for c in row.coefs)  # fp16-representable
    ctx = StageContext(spark, cfg, store, "t", RunLogger(None), "test")
    version, book, _ = latest_codebook(ctx)
    ids, recon = decode_item_codes(codes, book)
    stored = {r.item_id: r.recon_cosine for r in codes.select("item_id", "recon_cosine").collect()}
    order = {f"i{j}": j for j in range(240)}
    cos = np.array([recon[k] @ matrix[order[i]] for k, i in enumerate(ids)])
    np.testing.assert_allclose(cos, [stored[i] for i in ids], atol=1e-4)
    assert 0.5 < enc.summary["recon_cosine_mean"] <= 1.0
    assert store.count(schemas.CODEBOOKS) == 16


def test_encode_stats_aggregated_in_spark_equal_the_driver_formula(spark, cb_cfg) -> None:
    """encode's summary comes from Spark aggregates (no collect of the codes); it equals
    codebook_stats over the collected codes (p5: percentile_approx vs interpolated)."""
    from hymirec_udfs.codebook.stats import codebook_stats

    cfg = cb_cfg()
    _write_embeddings(spark, cfg, _clustered(300, 16, seed=3))
    run_stage(spark, cfg, "fit-codebook")
    enc = run_stage(spark, cfg, "encode")
    rows = get_table_store(spark, cfg).read(schemas.ITEM_CODES).select("codes", "recon_cosine").collect()
    expected = codebook_stats(np.array([r.codes for r in rows]), [8, 8], recon_cosine=[r.recon_cosine for r in rows],
                              dim=16)
    for key, value in expected.items():
        assert enc.summary[key] == pytest.approx(value, abs=0.02 if key == "recon_cosine_p5" else 1e-9), key


def test_item_store_streamed_from_the_tables(spark, cb_cfg) -> None:
    """build_item_store: catalog order, values (float16), codes, provenance; reused per inputs."""
    from hymirec_udfs.artifacts import build_item_store

    cfg = cb_cfg()
    matrix = _clustered(130, 16, seed=4)
    _write_embeddings(spark, cfg, matrix)
    run_stage(spark, cfg, "fit-codebook")
    run_stage(spark, cfg, "encode")
    store = get_table_store(spark, cfg)
    ctx = StageContext(spark, cfg, store, "t", RunLogger(None), "train")
    item_store = build_item_store(ctx, cfg)
    assert item_store.item_ids == sorted(f"i{j}" for j in range(130))
    order = [int(i[1:]) for i in item_store.item_ids]
    np.testing.assert_allclose(item_store.embeddings[1:].astype(np.float32), matrix[order], atol=1e-3)
    codes = {r.item_id: r.codes for r in store.read(schemas.ITEM_CODES).collect()}
    np.testing.assert_array_equal(item_store.codes[1:], [codes[i] for i in item_store.item_ids])
    version, _, _ = latest_codebook(ctx)
    assert item_store.meta["codebook_version"] == version and item_store.path
    again = build_item_store(StageContext(spark, cfg, store, "t2", RunLogger(None), "train"), cfg)
    assert again.path == item_store.path


def test_item_codes_keep_every_codebook_version_and_stores_read_the_latest(spark, cb_cfg) -> None:
    """A refit adds a version's codes beside the old ones (a model trained on the old codebook
    still finds its codes); re-encoding a version replaces only its own rows."""
    from pyspark.sql import functions as F

    from hymirec_udfs.artifacts import build_item_store

    cfg = cb_cfg()
    _write_embeddings(spark, cfg, _clustered(100, 8, seed=2))
    run_stage(spark, cfg, "fit-codebook")
    run_stage(spark, cfg, "encode")
    store = get_table_store(spark, cfg)
    ctx = StageContext(spark, cfg, store, "t", RunLogger(None), "train")
    first, _, _ = latest_codebook(ctx)
    old_codes = {r.item_id: list(r.codes) for r in store.read(schemas.ITEM_CODES).collect()}
    # a model was trained on the first version (registry off: job_runs says so), so a
    # refit's pruning keeps its codes
    from hymirec_udfs.core.lineage import JobRun, record_job_run

    record_job_run(store, spark, cfg, JobRun("train", "r", "success", "h", {}, {}, {}, {"codebook_version": first},
                                             1.0), NOW, None)

    refit = cb_cfg("codebook.ks=[4, 4]")  # another codebook: a new version
    run_stage(spark, refit, "fit-codebook")
    run_stage(spark, refit, "encode")
    second, _, _ = latest_codebook(StageContext(spark, refit, store, "t2", RunLogger(None), "train"))
    assert second != first
    by_version = {r.codebook_version: r["count"] for r in store.read(schemas.ITEM_CODES).groupBy("codebook_version")
                  .count().collect()}
    assert by_version == {first: 100, second: 100}
    kept = {r.item_id: list(r.codes) for r in store.read(schemas.ITEM_CODES)
            .where(F.col("codebook_version") == first).collect()}
    assert kept == old_codes  # untouched by the refit's encode

    item_store = build_item_store(StageContext(spark, refit, store, "t3", RunLogger(None), "train"), refit)
    assert item_store.meta["codebook_version"] == second
    assert int(item_store.codes[1:].max()) < 4  # the k=4 codebook's codes, not the k=8 ones
    # encoding the same version again replaces its rows (no duplicates), others stay
    from hymirec_udfs.codebook.stage import run_encode

    run_encode(spark, refit, StageContext(spark, refit, store, "t4", RunLogger(None), "encode_items"))
    assert store.read(schemas.ITEM_CODES).count() == 200


def test_euclidean_variant_stores_unit_coefs(spark, cb_cfg) -> None:
    cfg = cb_cfg("codebook.metric=euclidean")
    _write_embeddings(spark, cfg, _clustered(120, 8, seed=1))
    run_stage(spark, cfg, "fit-codebook")
    enc = run_stage(spark, cfg, "encode")
    assert enc.summary["metric"] == "euclidean"
    coefs = np.array([r.coefs for r in get_table_store(spark, cfg).read(schemas.ITEM_CODES).collect()])
    assert np.all(coefs == 1.0)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: m.__setitem__((3, 0), np.nan), "NaN"),
        (lambda m: m.__setitem__(5, 0.0), "zero"),
    ],
)
def test_bad_vectors_fail_without_tables(spark, cb_cfg, mutate, message) -> None:
    cfg = cb_cfg()
    matrix = _clustered(60, 8)
    mutate(matrix)
    _write_embeddings(spark, cfg, matrix)
    with pytest.raises(StageFailed, match=f"(?i){message}"):
        run_stage(spark, cfg, "fit-codebook")
    assert not get_table_store(spark, cfg).exists(schemas.CODEBOOKS)


def test_k_larger_than_basepool_and_empty_and_dim_mismatch(spark, cb_cfg) -> None:
    cfg = cb_cfg("codebook.ks=[50]")
    _write_embeddings(spark, cfg, _clustered(20, 8))
    with pytest.raises(StageFailed, match=r"k=50.*20"):
        run_stage(spark, cfg, "fit-codebook")

    cfg = cb_cfg("codebook.ks=[4]")
    run_stage(spark, cfg, "fit-codebook")
    _write_embeddings(spark, cfg, _clustered(20, 12))  # same model id, other dimension
    with pytest.raises(StageFailed, match=r"dimension \[12\] does not match codebook .*D=8"):
        run_stage(spark, cfg, "encode")
    assert not get_table_store(spark, cfg).exists(schemas.ITEM_CODES)

    other = cb_cfg("embed.pooling=cls")  # another model id: no embeddings for it
    with pytest.raises(StageFailed, match="no rows for model"):
        run_stage(spark, other, "fit-codebook")


def test_encode_names_bad_items_and_keeps_the_previous_item_codes(spark, cb_cfg) -> None:
    """Vectors that only appear after the fit (not in the basepool) fail the encode by item id."""
    from hymirec_udfs.artifacts import current_model_id

    cfg = cb_cfg("codebook.ks=[4]")
    good = _clustered(40, 8)
    _write_embeddings(spark, cfg, good)
    run_stage(spark, cfg, "fit-codebook")
    run_stage(spark, cfg, "encode")
    store = get_table_store(spark, cfg)
    version = store.version(schemas.ITEM_CODES)

    bad = good.copy()
    bad[7, 2] = np.nan
    _write_embeddings(spark, cfg, bad, tag="-changed")  # changed items are re-encoded
    with pytest.raises(StageFailed, match=r"(?s)item ids \['i7'\].*NaN"):
        run_stage(spark, cfg, "encode")
    assert store.version(schemas.ITEM_CODES) == version

    # A row whose array is shorter than its declared dim: named, never reshaped across rows.
    model_id = current_model_id(cfg.embed)
    rows = [(f"i{j}", [float(v) for v in (vec[:7] if j == 11 else vec)], 8, model_id, f"h{j}-v3", NOW)
            for j, vec in enumerate(good)]
    store.overwrite(schemas.ITEM_EMBEDDINGS, spark.createDataFrame(rows, schemas.spark_schema(schemas.ITEM_EMBEDDINGS)))
    with pytest.raises(StageFailed, match=r"dimension 8 \(item ids \['i11'\], lengths \[7\]\)"):
        run_stage(spark, cfg, "encode")
    assert store.version(schemas.ITEM_CODES) == version
    assert store.count(schemas.ITEM_CODES) == 40



def _drifted(n: int, d: int) -> np.ndarray:
    """Items from another distribution: one direction the fit never saw, plus noise."""
    rng = np.random.default_rng(99)
    x = 3.0 * rng.normal(size=(1, d)) + 0.3 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _health(spark, cfg) -> list:
    return get_table_store(spark, cfg).read(schemas.CODEBOOK_HEALTH).orderBy("created_at").collect()


def test_daily_new_items_are_encoded_with_the_pinned_codebook(spark, cb_cfg) -> None:
    """New items of the same distribution: no refit, only they are encoded, same version."""
    cfg = cb_cfg("codebook.min_new_items=5", "codebook.holdout_fraction=0.2")
    matrix = _clustered(260, 16)
    _write_embeddings(spark, cfg, matrix[:220])
    first = run_stage(spark, cfg, "fit-codebook")
    run_stage(spark, cfg, "encode")
    store = get_table_store(spark, cfg)
    codes_before = {r.item_id: list(r.codes) for r in store.read(schemas.ITEM_CODES).collect()}

    _write_embeddings(spark, cfg, matrix)  # 40 new items, the 220 unchanged
    fit = run_stage(spark, cfg, "fit-codebook")
    assert not fit.summary["refit"] and fit.summary["reason"].startswith("pinned: drift")
    assert fit.summary["version"] == first.summary["version"] and fit.row_counts["new_items"] == 40
    health = _health(spark, cfg)[-1]
    assert health.new_items == 40 and not health.refit and health.drift_score < cfg.codebook.drift_threshold
    assert 0 < health.reference_recon_cosine < 1 and health.occupancy_skew >= 1 and health.collision_rate >= 0
    enc = run_stage(spark, cfg, "encode")
    assert enc.row_counts["encoded"] == 40 and enc.summary["encode_mode"] == "incremental"
    codes = {r.item_id: list(r.codes) for r in store.read(schemas.ITEM_CODES).collect()}
    assert len(codes) == 260 and all(codes[i] == c for i, c in codes_before.items())
    # a re-run encodes nothing and writes nothing
    version = store.version(schemas.ITEM_CODES)
    assert run_stage(spark, cfg, "encode").row_counts["encoded"] == 0
    assert store.version(schemas.ITEM_CODES) == version


def test_drift_trips_a_warm_aligned_refit_that_keeps_most_codes(spark, cb_cfg) -> None:
    """Items from another distribution trip the drift score; the refit is warm-started and
    aligned, so most items keep their codes (and far more than a cold refit keeps)."""
    from pyspark.sql import functions as F

    cfg = cb_cfg("codebook.min_new_items=5", "codebook.holdout_fraction=0.2")
    base = _clustered(240, 16)
    _write_embeddings(spark, cfg, base)
    first = run_stage(spark, cfg, "fit-codebook")
    run_stage(spark, cfg, "encode")
    _write_embeddings(spark, cfg, np.concatenate([base, _drifted(40, 16)]))
    fit = run_stage(spark, cfg, "fit-codebook")
    assert fit.summary["refit"] and fit.summary["reason"].startswith("drift")
    assert fit.summary["warm_started"] and fit.summary["parent_version"] == first.summary["version"]
    health = _health(spark, cfg)[-1]
    assert health.refit and health.drift_score >= cfg.codebook.drift_threshold
    assert health.new_version == fit.summary["version"]
    enc = run_stage(spark, cfg, "encode")
    assert enc.summary["encode_mode"] == "full" and enc.summary["codes_compared"] == 240
    aligned = enc.summary["codes_unchanged"]

    # the same refit, cold and unaligned (another seed), for comparison
    cold = cb_cfg("codebook.refit=always", "codebook.warm_start=false", "codebook.seed=7",
                  "codebook.prune_codes=false")  # keep the first version's codes to compare
    run_stage(spark, cold, "fit-codebook")
    store = get_table_store(spark, cfg)
    versions = [r.version for r in store.read(schemas.CODEBOOKS).select("version", "created_at").distinct()
                .orderBy("created_at").collect()]
    run_stage(spark, cold, "encode")
    new = store.read(schemas.ITEM_CODES).where(F.col("codebook_version") == versions[-1]).alias("n")
    old = store.read(schemas.ITEM_CODES).where(F.col("codebook_version") == versions[0]).alias("o")
    unaligned = new.join(old, "item_id").agg(F.avg((F.col("n.codes") == F.col("o.codes")).cast("double"))).first()[0]
    print("codes unchanged (all layers): aligned", aligned, "unaligned", unaligned)
    assert aligned >= 0.5 and aligned > unaligned + 0.3, (aligned, unaligned)


def _register_run_on(cfg, codebook_version: str) -> None:
    """A registered model version whose training run used ``codebook_version``."""
    import mlflow

    from hymirec_udfs.core import registry
    from hymirec_udfs.core.tracking import configure_mlflow

    class Constant(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):  # noqa: ARG002
            return model_input

    configure_mlflow(cfg)
    with mlflow.start_run(tags={"hymirec.codebook_version": codebook_version}) as run:
        mlflow.pyfunc.log_model(name="model", python_model=Constant())
    registry.register(cfg, run.info.run_id)


def test_refits_prune_codes_no_registered_model_uses(spark, cb_cfg) -> None:
    """Four refits: item_codes keeps the latest version, the one it was aligned to, and
    the version a registered model was trained on; the others are deleted."""
    cfg = cb_cfg("codebook.refit=always", tracking=True)
    store = get_table_store(spark, cfg)
    base = _clustered(120, 16)
    versions, pruned = [], []
    for day in range(4):
        _write_embeddings(spark, cfg, base, tag=f"d{day}")
        versions.append(run_stage(spark, cfg, "fit-codebook").summary["version"])
        enc = run_stage(spark, cfg, "encode")
        assert enc.summary["encode_mode"] == "full"
        pruned.append(enc.summary["pruned_versions"])
        if day == 0:
            _register_run_on(cfg, versions[0])
    assert pruned == [[], [], [], [versions[1]]], (versions, pruned)
    assert enc.summary["codes_kept_because"] == "registered model 'hymirec'" and enc.summary["pruned_rows"] == 120
    left = {r.codebook_version for r in store.read(schemas.ITEM_CODES).select("codebook_version").distinct().collect()}
    assert left == {versions[0], versions[2], versions[3]}
    assert store.count(schemas.ITEM_CODES) == 3 * 120


def test_without_the_registry_train_runs_keep_their_codes_and_a_failing_registry_prunes_nothing(
        spark, cb_cfg) -> None:
    from hymirec_udfs.codebook.stage import prune_codes

    cfg = cb_cfg("codebook.refit=always", "codebook.prune_codes=false")
    store = get_table_store(spark, cfg)
    base = _clustered(120, 16)
    versions = []
    for day in range(3):
        _write_embeddings(spark, cfg, base, tag=f"d{day}")
        versions.append(run_stage(spark, cfg, "fit-codebook").summary["version"])
        run_stage(spark, cfg, "encode")
    ctx = StageContext(spark, cfg, store, "t", RunLogger(None), "test")
    # the registry is on but cannot answer (tracking points at a file, not a database)
    broken = cb_cfg("tracking.tracking_uri=sqlite:////dev/null/nowhere.db", tracking=True)
    out = prune_codes(StageContext(spark, broken, store, "t", RunLogger(None), "test"), broken, keep={versions[2]})
    assert "prune_skipped" in out and store.count(schemas.ITEM_CODES) == 3 * 120
    # registry off: a successful train run on versions[0] keeps it
    from hymirec_udfs.core.lineage import JobRun, record_job_run

    record_job_run(store, spark, cfg, JobRun("train", "r", "success", "h", {}, {}, {},
                                             {"codebook_version": versions[0]}, 1.0), NOW, None)
    off = cb_cfg("registry.enabled=false")
    out = prune_codes(ctx, off, keep={versions[2]})
    assert out["pruned_versions"] == [versions[1]] and out["codes_kept_because"] == "train runs in job_runs"
    left = {r.codebook_version for r in store.read(schemas.ITEM_CODES).select("codebook_version").distinct().collect()}
    assert left == {versions[0], versions[2]}
