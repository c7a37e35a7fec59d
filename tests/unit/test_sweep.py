"""The tuning sweep: successive halving on validation (unit) and its quick run (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench_modules import load_benchmark


def _sweep():
    return load_benchmark("sweep")


def test_successive_halving_keeps_the_best_third_and_ends_with_one() -> None:
    seen = []

    def scores(r, budget, alive):
        seen.append((r, budget, list(alive)))
        return {n: {"a": 0.1, "b": 0.3, "c": 0.2, "d": 0.3, "e": 0.0}[n] + 0.01 * budget for n in alive}

    rounds = _sweep().successive_halving(scores, ["a", "b", "c", "d", "e"], [1, 3], eta=3)
    assert seen == [(0, 1, ["a", "b", "c", "d", "e"]), (1, 3, ["b", "d"])]  # ceil(5 / 3) = 2 kept; tie: earlier
    assert rounds[0]["kept"] == ["b", "d"] and rounds[1]["kept"] == ["b"]
    assert list(rounds[0]["scores"]) == ["b", "d", "c", "a", "e"]  # ranked best first


def test_unknown_configuration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        _sweep().main(["--quick", "--only", "base,no-such-config", "--out", str(tmp_path)])


@pytest.mark.spark
@pytest.mark.slow
def test_quick_sweep_runs_judges_on_validation_and_resumes(spark, tmp_path: Path) -> None:
    args = ["--quick", "--out", str(tmp_path), "--work", str(tmp_path / "work")]
    summary = _sweep().main(args)
    written = json.loads((tmp_path / "sweep.json").read_text())
    assert written["best"] == summary["best"] and written["judged_on"] == "valid ndcg@10"
    first, last = written["rounds"]
    assert len(first["scores"]) == 3 and first["kept"] == list(first["scores"])[:1]
    assert list(last["scores"]) == first["kept"] and last["kept"] == [written["best"]]
    assert all(0.0 <= v["valid_n10"] <= 1.0 for v in written["runs"].values())
    assert "--models hymirec,sasrec" in written["next"]
    # resumable: every (round, configuration) left its result file, read back on a re-run
    assert len(list((tmp_path / "sweep").glob("round*/hymirec-seed0.json"))) == 4
    assert _sweep().main(args)["rounds"] == summary["rounds"]
