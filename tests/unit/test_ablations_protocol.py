"""Table 4 under the quality protocol: the variants as overrides, the summary (unit), the quick run (slow)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from tests.bench_modules import load_benchmark


def _ablations():
    return load_benchmark("ablations")


def test_every_variant_as_overrides_is_the_stage_s_variant() -> None:
    from hymirec_udfs.ablations.variants import VARIANTS, variant_config
    from hymirec_udfs.core.config import load_config

    base = load_config(["local"], [])
    for name in VARIANTS:
        sets = _ablations().variant_sets(name)
        by_sets, by_stage = load_config(["local"], sets), variant_config(base, name)
        for section in ("model", "dmil", "codebook"):
            mine, theirs = dataclasses.asdict(getattr(by_sets, section)), dataclasses.asdict(getattr(by_stage, section))
            if name == "euclidean codebook" and section == "codebook":
                assert mine.pop("balance") is False  # plain k-means, as the stage's in-memory variant
                theirs.pop("balance")
            assert mine == theirs, (name, section)
    assert _ablations().variant_sets("w/o DMIL") == ["dmil.enabled=false"]


def _run(ranks, users=("u1", "u2", "u3"), epochs=2):
    return {"user_ids": list(users), "ranks": ranks, "epochs": epochs}


def test_summary_by_hand_and_mismatched_users_fail() -> None:
    a = _ablations()
    runs = {"hymirec": {0: _run([1, 20, 300]), 1: _run([2, 60, 100])},
            "w/o DMIL": {0: _run([30, 40, 500]), 1: _run([11, 1, 150])}}
    s = a.summarise(runs, [0, 1])
    assert s["users"] == 3
    assert s["hymirec_r10_mean"] == pytest.approx(1 / 3) and s["hymirec_r10_std"] == 0.0
    assert s["w_o_dmil_r10_mean"] == pytest.approx(1 / 6)
    assert s["hymirec_r200_mean"] == pytest.approx(5 / 6)  # seed 0 misses rank 300: (2/3 + 1) / 2
    ndcg_u1 = np.mean([1.0, 1 / np.log2(3)])
    assert s["hymirec_n10_mean"] == pytest.approx(ndcg_u1 / 3)
    low, high = s["w_o_dmil_minus_hymirec_r10_ci"]
    assert -1.0 <= low <= high <= 1.0 and "hymirec_minus_hymirec_r10_ci" not in s
    assert s["w_o_dmil_epochs"] == [2, 2]
    table = a.table(s, ["hymirec", "w/o DMIL"])
    assert table.splitlines()[3].startswith("| w/o DMIL | 0.1667 ± 0.2357")
    runs["w/o DMIL"][1] = _run([1, 1, 1], users=("u1", "u2", "u9"))
    with pytest.raises(ValueError, match="other test users"):
        a.summarise(runs, [0, 1])
    runs["w/o DMIL"] = {seed: {**_run([1, 1, 1]), "target_ids": ["a", "b", "c"]} for seed in (0, 1)}
    runs["hymirec"] = {seed: {**_run([1, 1, 1]), "target_ids": ["a", "b", "x"]} for seed in (0, 1)}
    with pytest.raises(ValueError, match="different test targets"):
        a.summarise(runs, [0, 1])


def test_bad_arguments_are_refused_before_any_work(tmp_path: Path) -> None:
    for bad in (["--variants", "w/o everything"], ["--epochs", "-1"], ["--epochs", "0"],
                ["--set", "codebook.ks=[4, 4]"], ["--set", "paths.work_dir=/elsewhere"]):
        with pytest.raises(SystemExit):
            _ablations().main(["--quick", "--out", str(tmp_path), *bad])


@pytest.mark.spark
@pytest.mark.slow
def test_quick_ablations_fixed_budget_own_codebook_and_resume(spark, tmp_path: Path) -> None:
    args = ["--quick", "--out", str(tmp_path), "--work", str(tmp_path / "work")]
    summary = _ablations().main(args)
    written = json.loads((tmp_path / "ablations-quick.json").read_text())
    assert written["variants"] == ["hymirec", "euclidean codebook", "w/o DMIL"] and written["epochs"] == 1
    for s in ("hymirec", "w_o_dmil", "euclidean_codebook"):
        assert written[f"{s}_epochs"] == [1] and written[f"{s}_best_epoch"] == [1]
        run = json.loads((tmp_path / "ablations" / s / "hymirec-seed0.json").read_text())
        assert {"train.early_stopping_patience=0", "train.epochs=1"} <= set(run["settings"])  # the fixed budget
        assert 0.0 <= written[f"{s}_r10_mean"] <= written[f"{s}_r50_mean"] <= written[f"{s}_r200_mean"] <= 1.0
    low, high = written["euclidean_codebook_minus_hymirec_r10_ci"]
    assert -1.0 <= low <= high <= 1.0
    # the Euclidean codebook was fitted in its own work dir; the shared one keeps the cosine codebook
    eu = json.loads((tmp_path / "ablations" / "euclidean_codebook" / "hymirec-seed0.json").read_text())
    assert "codebook.metric=euclidean" in eu["settings"] and (tmp_path / "work-euclidean").is_dir()
    from hymirec_udfs.core import schemas
    from hymirec_udfs.core.config import load_config
    from hymirec_udfs.core.tables import get_table_store

    def metrics(work):
        cfg = load_config(["local"], [f"paths.work_dir={work}"])
        return {r.metric for r in get_table_store(spark, cfg).read(schemas.CODEBOOKS).select("metric").collect()}

    assert metrics(tmp_path / "work") == {"cosine"} and metrics(tmp_path / "work-euclidean") == {"euclidean"}
    # resumable: every (variant, seed) left its result file, read back (not rewritten) on a re-run
    files = sorted((tmp_path / "ablations").glob("*/hymirec-seed0.json"))
    stamps = [f.stat().st_mtime_ns for f in files]
    assert len(files) == 3 and _ablations().main(args)["hymirec_r10_mean"] == summary["hymirec_r10_mean"]
    assert [f.stat().st_mtime_ns for f in files] == stamps
