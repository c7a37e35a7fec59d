"""Smoke test: every stage of the pipeline on a tiny synthetic catalog, then a no-op re-run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hymirec_udfs.core import schemas
from hymirec_udfs.pipeline import run_pipeline
from hymirec_udfs.core.tables import get_table_store

pytestmark = [pytest.mark.spark, pytest.mark.integration, pytest.mark.slow]

TINY = [
    "ingest.source=synthetic", "synthetic.n_items=150", "synthetic.n_users=40", "synthetic.mean_history=12",
    "embed.pooling=last_token", "embed.max_tokens=32",
    "codebook.ks=[8, 8]", "codebook.iters=5",
    "sequences.recent_window=5", "sequences.max_long=10", "sequences.max_samples_per_user=8",
    "model.llm_hidden=32", "model.llm_layers=1", "model.llm_heads=2", "model.llm_kv_heads=2",
    "model.llm_intermediate=64", "model.light_width=32", "model.light_heads=2", "model.light_layers=1",
    "dmil.negatives=32", "train.epochs=2", "train.batch_size=32", "train.warmup_steps=2",
    "train.num_processes=2", "evaluate.chunk_items=64",
]


def test_whole_pipeline_then_noop_rerun(spark, make_cfg, tiny_llama_dir) -> None:
    cfg = make_cfg(f"embed.model={tiny_llama_dir}", *TINY, tracking=True)
    lines: list[str] = []
    jobs = run_pipeline(spark, cfg, echo=lines.append)
    assert [j.stage for j in jobs] == [s for s in (
        "ingest", "train_content_encoder", "embed_items", "fit_codebook", "encode_items", "build_sequences", "train",
        "evaluate", "recommend") if s in {j.stage for j in jobs}]
    ran = {j.stage: j for j in jobs if not j.skipped}
    assert {"ingest", "embed_items", "fit_codebook", "encode_items", "build_sequences", "train", "evaluate",
            "recommend"} <= set(ran)
    assert ran["recommend"].row_counts["users"] == 40  # every user served

    store = get_table_store(spark, cfg)
    assert store.count(schemas.ITEMS) == 150 == store.count(schemas.ITEM_EMBEDDINGS) == store.count(schemas.ITEM_CODES)
    metrics = store.read(schemas.EVAL_METRICS).collect()
    assert {(r.model, r.split) for r in metrics} == {(m, s) for m in ("hymirec", "sasrec", "hllm") for s in ("valid", "test")}
    assert {r.k for r in metrics} == {10, 50, 100, 200}
    users = ran["evaluate"].row_counts["test_users"]
    assert users == ran["build_sequences"].row_counts["users"]
    for r in metrics:
        assert 0.0 <= r.ndcg <= r.recall <= 1.0 and r.users == users and r.users_target_absent == 0
    by_k = {(r.model, r.split, r.k): r.recall for r in metrics}
    assert by_k[("hymirec", "test", 200)] == 1.0  # 150 items < 200: every target is within the cut
    per_user = store.read(schemas.EVAL_PER_USER).where("model = 'hymirec' AND split = 'test'").collect()
    assert len(per_user) == users and all(1 <= r.rank <= 150 for r in per_user)
    assert all(r.interest_diversity is not None and -1.0 <= r.interest_diversity <= 1.0 for r in per_user)
    recall10 = np.mean([r.hit[10] for r in per_user])
    assert recall10 == pytest.approx(by_k[("hymirec", "test", 10)])

    summary = ran["evaluate"].summary
    assert Path(summary["report"]).is_file() and "hymirec" in summary["metrics_table"]
    train_summary = ran["train"].summary
    assert Path(train_summary["best_checkpoint"]).is_file()

    import mlflow

    mlflow.set_tracking_uri(cfg.tracking_uri)
    run = mlflow.get_run(ran["train"].mlflow_run_id)
    assert "loss" in run.data.metrics and run.info.status == "FINISHED"
    model = mlflow.pytorch.load_model(f"runs:/{ran['train'].mlflow_run_id}/model")
    assert model is not None

    again = run_pipeline(spark, cfg, echo=lines.append)
    assert all(j.skipped for j in again), [(j.stage, j.status) for j in again]
    runs = store.read(schemas.JOB_RUNS).where("status = 'success'").collect()
    lineage = {r.stage: r for r in runs}
    assert lineage["train"].input_versions[schemas.SEQUENCES] == store.version(schemas.SEQUENCES)
    assert json.loads(lineage["evaluate"].summary)["report"] == summary["report"]
