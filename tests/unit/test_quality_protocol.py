"""The quality protocol's statistics (unit) and its quick run end to end (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.bench_modules import load_benchmark

REPO = Path(__file__).resolve().parents[2]


def _quality():
    return load_benchmark("quality")


def test_metrics_from_ranks_by_hand() -> None:
    hit, ndcg = _quality().metrics_from_ranks(np.array([1, 3, 11, 0]), k=10)
    assert hit.tolist() == [1.0, 1.0, 0.0, 0.0]  # rank 0: target absent, a miss
    assert ndcg.tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])


def test_paired_bootstrap_interval_covers_the_true_gap_and_is_reproducible() -> None:
    q = _quality()
    rng = np.random.default_rng(1)
    a = rng.binomial(1, 0.30, 2000).astype(float)
    b = np.where(rng.random(2000) < 0.9, a, 1 - a)  # paired: mostly the same users hit
    low, high = q.paired_bootstrap_ci(a, b)
    assert low <= (a - b).mean() <= high
    assert (low, high) == q.paired_bootstrap_ci(a, b)
    assert q.paired_bootstrap_ci(a, a) == (0.0, 0.0)
    assert all(math.isnan(x) for x in q.paired_bootstrap_ci(np.array([]), np.array([])))


def test_summary_slices_and_mismatched_users_fail() -> None:
    q = _quality()
    run = lambda ranks: {"user_ids": ["u1", "u2", "u3"], "target_ids": ["cold", "hot", "hot"], "ranks": ranks}
    runs = {"hymirec": {0: run([1, 50, 2]), 1: run([2, 60, 3])}, "sasrec": {0: run([30, 1, 1]), 1: run([40, 1, 1])}}
    summary = q.summarise(runs, {"cold": 1, "hot": 500}, [0, 1])
    assert summary["hymirec_r10_mean"] == pytest.approx(2 / 3)
    assert summary["cold_users"] == 1 and summary["cold_hymirec_r10_mean"] == 1.0 and summary["cold_sasrec_r10_mean"] == 0.0
    assert summary["cold_hymirec_minus_sasrec_r10_ci"] == [1.0, 1.0]
    assert summary["unseen_users"] == 0  # every target has a training user here
    # median over users of each user's rank averaged over seeds: hymirec 1.5, 55, 2.5
    assert summary["hymirec_median_rank"] == 2.5 and summary["cold_hymirec_median_rank"] == 1.5
    assert summary["cold_sasrec_median_rank"] == 35.0 and summary["unseen_sasrec_median_rank"] is None
    unseen = q.summarise(runs, {"hot": 500}, [0, 1])  # "cold" never seen in training
    assert unseen["unseen_users"] == 1 and unseen["unseen_hymirec_r10_mean"] == 1.0
    absent = q.summarise({"hymirec": {0: run([0, 7, 0]), 1: run([0, 9, 4])}}, {}, [0, 1])
    assert absent["hymirec_median_rank"] == 6.0  # rank 0 (absent) left out: users at 8 and 4
    runs["sasrec"][1] = {**run([1, 1, 1]), "user_ids": ["u1", "u2", "u9"]}
    with pytest.raises(ValueError, match="other test users"):
        q.summarise(runs, {}, [0, 1])


def test_hymirec_is_paired_against_every_other_model() -> None:
    q = _quality()
    users = {"user_ids": ["u1", "u2"], "target_ids": ["a", "b"]}
    runs = {"hymirec": {0: {**users, "ranks": [1, 1]}}, "sasrec": {0: {**users, "ranks": [1, 50]}},
            "hllm": {0: {**users, "ranks": [50, 50]}}}
    summary = q.summarise(runs, {}, [0])
    assert summary["hymirec_minus_hllm_r10_ci"] == [1.0, 1.0]
    assert 0.0 <= summary["hymirec_minus_sasrec_r10_ci"][0] <= summary["hymirec_minus_sasrec_r10_ci"][1] <= 1.0
    assert "HyMiRec - hllm R@10 95% CI [+1.0000, +1.0000]" in q.table(summary, ["hymirec", "sasrec", "hllm"])


@pytest.mark.spark
@pytest.mark.slow
def test_quick_protocol_writes_the_summary(spark, tmp_path: Path) -> None:
    own = ["--model-set", "sasrec:model.dropout=0.2"]
    summary = _quality().main(["--quick", "--models", "hymirec,sasrec", "--out", str(tmp_path),
                               "--work", str(tmp_path / "work"), *own])
    assert "model.dropout=0.2" in summary["settings"]["sasrec"]
    assert not any(s.startswith("model.dropout=") for s in summary["settings"]["hymirec"])
    recorded = json.loads((tmp_path / "runs" / "sasrec-seed1.json").read_text())["settings"]
    assert recorded == summary["settings"]["sasrec"]
    written = json.loads((tmp_path / "quality.json").read_text())
    assert written["seeds"] == [0, 1] and written == json.loads(json.dumps(summary, sort_keys=True))
    for key in ("hymirec_r10_mean", "hymirec_r10_std", "sasrec_n10_mean", "cold_hymirec_r10_mean"):
        assert 0.0 <= written[key] <= 1.0 or math.isnan(written[key])
    low, high = written["hymirec_minus_sasrec_r10_ci"]
    assert -1.0 <= low <= high <= 1.0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "hymirec-seed0.json", "hymirec-seed1.json", "sasrec-seed0.json", "sasrec-seed1.json"]
    # resumable: a second call reads the result files back instead of training
    stamps = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "runs").iterdir()}
    again = _quality().main(["--quick", "--models", "hymirec,sasrec", "--out", str(tmp_path),
                             "--work", str(tmp_path / "work"), *own])
    assert again["hymirec_r10_mean"] == written["hymirec_r10_mean"]
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "runs").iterdir()} == stamps
    # the same runs dir under other settings is refused, not mixed in
    with pytest.raises(ValueError, match="sasrec-seed0.json was trained with"):
        _quality().main(["--quick", "--models", "sasrec", "--out", str(tmp_path), "--work", str(tmp_path / "work")])


@pytest.mark.spark
@pytest.mark.slow
def test_quick_time_split_protocol_has_unseen_test_items(spark, tmp_path: Path) -> None:
    # the quick catalog's users are active briefly and staggered: early, close quantiles
    # leave test users (0.8/0.9, the default, leaves none and fails clearly, below)
    summary = _quality().main(["--quick", "--models", "hymirec", "--seeds", "0", "--time-split", "0.3,0.35",
                               "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    cuts = summary["time_split"]
    assert summary["protocol"] == "hymirec time-split"
    assert 0 < cuts["sequences.valid_cutoff"] < cuts["sequences.test_cutoff"]
    assert summary["users"] > 0 and summary["unseen_users"] <= summary["cold_users"] <= summary["users"]
    with pytest.raises(ValueError, match="leaves no test sample"):
        _quality().main(["--quick", "--models", "hymirec", "--seeds", "0", "--time-split", "--out",
                         str(tmp_path / "late"), "--work", str(tmp_path / "late-work")])


def test_run_settings_last_override_wins_and_leaves_out_where() -> None:
    q = _quality()
    assert q.run_settings(["paths.work_dir=/tmp/x", "train.epochs=20", "tracking.enabled=false",
                           "model.dropout=0.3", "train.epochs=2", "spark.master=local[2]"]) == [
        "model.dropout=0.3", "train.epochs=2"]
    # values as config loading reads them: the same setting however it is spelled
    assert q.run_settings(["model.dropout=0.30", "dmil.learnable_temperature=True", "codebook.ks=[8,8]",
                           "model.item_adapter=mlp_id"]) == q.run_settings(
        ["model.dropout=0.3", "dmil.learnable_temperature=true", "codebook.ks=[8, 8]", "model.item_adapter=mlp_id"])
    assert "model.item_adapter=mlp_id" in q.run_settings(["model.item_adapter=mlp_id"])  # strings stay bare


def test_a_result_file_is_read_back_only_under_its_own_settings(tmp_path: Path) -> None:
    q = _quality()
    runs = tmp_path / "runs"
    runs.mkdir()
    done = {"model": "sasrec", "seed": 0, "settings": ["model.dropout=0.3", "train.epochs=20"], "ranks": [1]}
    (runs / "sasrec-seed0.json").write_text(json.dumps(done))
    # same settings (other order, other work dir): read back without Spark
    back = q.run_one(None, ["local"], ["train.epochs=20", "paths.work_dir=/elsewhere", "model.dropout=0.3"],
                     "sasrec", 0, runs)
    assert back == done
    # other settings: a clear error naming the file and what differs, never a silent reuse
    with pytest.raises(ValueError, match=r"sasrec-seed0\.json was trained with .*model\.dropout=0\.1"):
        q.run_one(None, ["local"], ["train.epochs=20", "model.dropout=0.1"], "sasrec", 0, runs)
    # a file without recorded settings is not trusted either
    (runs / "sasrec-seed1.json").write_text(json.dumps({"model": "sasrec", "seed": 1, "ranks": [1]}))
    with pytest.raises(ValueError, match="trained with settings None"):
        q.run_one(None, ["local"], ["train.epochs=20"], "sasrec", 1, runs)


def test_model_set_is_checked_before_any_work(tmp_path: Path) -> None:
    for bad in (["--model-set", "sasrec"], ["--model-set", "bert4rec:model.dropout=0.3"], ["--models", "gru4rec"],
                ["--model-set", "hymirec:codebook.ks=[4, 4]"], ["--model-set", "sasrec:sequences.split=time_cutoff"]):
        with pytest.raises(SystemExit):
            _quality().main(["--quick", "--out", str(tmp_path), *bad])


def test_a_stacked_profile_is_part_of_a_run_s_settings() -> None:
    q = _quality()
    assert q.run_settings(["train.epochs=20"], ["local", "stage1-minilm"]) == [
        "profiles=local,stage1-minilm", "train.epochs=20"]
    assert q.run_settings(["train.epochs=20"], ["local"]) == ["train.epochs=20"]  # as recorded before profiles


@pytest.mark.spark
@pytest.mark.slow
def test_quick_protocol_with_stage1_fine_tunes_then_embeds(spark, tmp_path: Path) -> None:
    from hymirec_udfs.artifacts import current_model_id
    from hymirec_udfs.core import schemas
    from hymirec_udfs.core.config import load_config
    from hymirec_udfs.core.tables import get_table_store

    work = tmp_path / "work"
    summary = _quality().main(["--quick", "--models", "hymirec", "--seeds", "0", "--profile", "local,stage1-minilm",
                               "--set", "stage1.max_steps=2", "--set", "stage1.batch_size=4",
                               "--set", "stage1.negatives=8", "--out", str(tmp_path), "--work", str(work)])
    assert "profiles=local,stage1-minilm" in summary["settings"]["hymirec"]
    # the catalog was embedded by the fine-tuned encoder, not the base one
    cfg = load_config(["local"], [f"paths.work_dir={work}", *_quality().QUICK])
    store = get_table_store(spark, cfg)
    ids = {r.model_id for r in store.read(schemas.ITEM_EMBEDDINGS).select("model_id").distinct().collect()}
    fine_tuned = load_config(["local", "stage1-minilm"], [f"paths.work_dir={work}", *_quality().QUICK])
    assert ids == {current_model_id(fine_tuned.embed, store, fine_tuned.stage1)}
    assert current_model_id(cfg.embed) not in ids
