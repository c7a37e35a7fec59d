"""Smoke test: every stage of the pipeline on a tiny synthetic catalog, then a no-op re-run."""

from __future__ import annotations

import json
import os
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
    "train.num_processes=2", "evaluate.chunk_items=64", "tracking.progress_every_s=0.5",
]


def test_whole_pipeline_then_noop_rerun(spark, make_cfg, tiny_llama_dir, tmp_path) -> None:
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
    # registered, challenger, and (the first model) champion; recommend served models:/hymirec@champion
    assert summary["registry.version"] == "1" and summary["promotion.promoted"] == 1
    assert summary["registry.champion_version"] == "1"
    served = ran["recommend"].summary
    assert (served["model_name"], served["model_version"]) == ("hymirec", "1")
    assert served["model_run_id"] == ran["train"].mlflow_run_id
    assert {r.model_version for r in store.read(schemas.RECOMMENDATIONS).select("model_version").collect()} == {"1"}
    train_summary = ran["train"].summary
    assert Path(train_summary["best_checkpoint"]).is_file()

    import mlflow

    mlflow.set_tracking_uri(cfg.tracking_uri)
    run = mlflow.get_run(ran["train"].mlflow_run_id)
    assert "loss" in run.data.metrics and run.info.status == "FINISHED"
    # every training step's loss reached the run (sent live by the metrics follower, once)
    records = [json.loads(x) for x in (Path(train_summary["best_checkpoint"]).parent / "metrics.jsonl")
               .read_text().splitlines()]
    steps = sorted(r["step"] for r in records if r["kind"] == "train")
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == steps and len(steps) >= 2
    # the SASRec baseline's weights: safetensors + configs, no pickled module (no MLmodel)
    logged = {a.path for a in mlflow.artifacts.list_artifacts(run_id=ran["evaluate"].mlflow_run_id,
                                                               artifact_path="sasrec_model")}
    assert {"sasrec_model/model.safetensors", "sasrec_model/model.json"} <= logged, logged
    assert "sasrec_model/MLmodel" not in logged

    again = run_pipeline(spark, cfg, echo=lines.append)
    assert all(j.skipped for j in again), [(j.stage, j.status) for j in again]
    runs = store.read(schemas.JOB_RUNS).where("status = 'success'").collect()
    lineage = {r.stage: r for r in runs}
    assert lineage["train"].input_versions[schemas.SEQUENCES] == store.version(schemas.SEQUENCES)
    assert json.loads(lineage["evaluate"].summary)["report"] == summary["report"]

    # The registered pyfunc, loaded by name in a fresh process, gives the recommend stage's lists.
    _pyfunc_matches_the_stage(spark, cfg, store, tmp_path)


def _pyfunc_matches_the_stage(spark, cfg, store, tmp_path: Path) -> None:
    import subprocess
    import sys

    import mlflow
    import pyarrow.parquet as pq
    from pyspark.sql import functions as F

    histories = store.read(schemas.SEQUENCES).select("user_id", "item_ids").orderBy("user_id").limit(12)
    inputs = tmp_path / "histories.parquet"
    pq.write_table(histories.toArrow(), inputs)
    outputs = tmp_path / "pyfunc_out.json"
    # The model runs on its own code: the wheel logged in code_paths, named by its
    # requirements.txt, installed alone into a folder the fresh process imports first.
    mlflow.set_tracking_uri(cfg.tracking_uri)
    model_dir = Path(mlflow.artifacts.download_artifacts("models:/hymirec@champion", dst_path=str(tmp_path / "m")))
    named = [r for r in (model_dir / "requirements.txt").read_text().split() if r.endswith(".whl")]
    assert len(named) == 1 and named[0].startswith("code/hymirec-0.1.0+g"), named
    own = tmp_path / "own_code"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(own),
                    str(model_dir / named[0])], check=True)
    script = (
        "import sys, json, mlflow, pandas as pd, hymirec_udfs\n"
        "assert hymirec_udfs.__file__.startswith(sys.argv[4]), hymirec_udfs.__file__\n"
        "mlflow.set_tracking_uri(sys.argv[1])\n"
        "model = mlflow.pyfunc.load_model('models:/hymirec@champion')\n"
        "out = model.predict(pd.read_parquet(sys.argv[2]))\n"
        "json.dump({u: [list(i), [float(x) for x in s]] for u, i, s in zip(out.user_id, out['items'], out.scores)},"
        " open(sys.argv[3], 'w'))\n")
    proc = subprocess.run([sys.executable, "-c", script, cfg.tracking_uri, str(inputs), str(outputs), str(own)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(own)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    fresh = json.loads(outputs.read_text())
    recs = store.read(schemas.RECOMMENDATIONS).orderBy("user_id", "rank").toPandas()
    stage = {u: (g.item_id.tolist(), g.score.tolist()) for u, g in recs.groupby("user_id")}
    assert set(fresh) == set(histories.toPandas().user_id)
    for user, (items, scores) in fresh.items():
        assert items == stage[user][0], user
        np.testing.assert_allclose(scores, stage[user][1], rtol=1e-5, atol=1e-6)

    # ... and so does mlflow.pyfunc.spark_udf over a DataFrame of histories.
    mlflow.set_tracking_uri(cfg.tracking_uri)
    udf = mlflow.pyfunc.spark_udf(spark, "models:/hymirec@champion", env_manager="local",
                                  result_type="user_id string, items array<string>, scores array<float>, "
                                              "interests array<array<float>>, skipped boolean")
    scored = histories.select("user_id", udf(F.struct("user_id", "item_ids")).alias("out")).collect()
    for row in scored:
        assert row.out["items"] == stage[row.user_id][0], row.user_id

