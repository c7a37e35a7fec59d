"""Levers compared step by step from finished protocol runs (``benchmarks/levers.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.bench_modules import load_benchmark

USERS = [f"u{i}" for i in range(40)]
TARGETS = [f"i{i}" for i in range(40)]


def _levers():
    return load_benchmark("levers")


def _write(folder: Path, model: str, ranks_by_seed: dict[int, list[int]], *, settings=("train.lr=0.001",),
           users=USERS, targets=TARGETS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, ranks in ranks_by_seed.items():
        order = np.random.default_rng(seed).permutation(len(users))  # files list users in any order
        (folder / f"{model}-seed{seed}.json").write_text(json.dumps({
            "model": model, "seed": seed, "settings": list(settings), "user_ids": [users[i] for i in order],
            "target_ids": [targets[i] for i in order], "ranks": [ranks[i] for i in order], "epochs": 5,
            "best_epoch": 3}))
    return folder


def test_steps_by_hand_and_the_sign_of_each_lever(tmp_path: Path) -> None:
    lv = _levers()
    base = _write(tmp_path / "base", "hymirec", {0: [1] * 10 + [50] * 30, 1: [3] * 5 + [50] * 35})
    better = _write(tmp_path / "better", "hymirec", {0: [1] * 30 + [50] * 10, 1: [2] * 28 + [50] * 12})
    ref = _write(tmp_path / "ref", "sasrec", {0: [1] * 20 + [50] * 20, 1: [1] * 20 + [50] * 20})
    summary = lv.main(["--step", f"base={base}", "--step", f"better={better}:hymirec", "--reference",
                       f"SASRec={ref}:sasrec", "--out", str(tmp_path / "levers.json")])
    first, second = summary["steps"]
    assert first["r10_mean"] == pytest.approx((10 / 40 + 5 / 40) / 2)
    assert first["r10_std"] == pytest.approx(np.std([10 / 40, 5 / 40], ddof=1))
    assert first["n10_mean"] == pytest.approx((10 / 40 + 5 / 40 * 0.5) / 2)  # rank 3: 1/log2(4)
    assert second["r10_mean"] == pytest.approx((30 / 40 + 28 / 40) / 2)
    low, high = second["minus_previous"]["r10_ci"]
    assert 0 < low <= second["r10_mean"] - first["r10_mean"] <= high  # the lever clearly helps
    assert second["minus_first"] == second["minus_previous"]
    low, high = first["minus_reference"]["r10_ci"]
    assert high < 0  # the base is clearly behind the reference
    assert "minus_previous" not in first and summary["reference"]["name"] == "SASRec"
    assert first["settings"] == ["train.lr=0.001"] and first["epochs"] == [[5, 3], [5, 3]]
    assert json.loads((tmp_path / "levers.json").read_text())["steps"][1]["name"] == "better"
    table = lv.table(summary).splitlines()
    assert len(table) == 5 and table[2].startswith("| base | 2 | — | 0.1875 ± 0.0884")


def test_slices_by_training_users() -> None:
    lv = _levers()
    ranks = {0: [1] * 20 + [50] * 20, 1: [1] * 20 + [50] * 20}
    step = lv.per_user("s", {s: {"user_ids": USERS, "target_ids": TARGETS, "ranks": r} for s, r in ranks.items()})
    popularity = {t: (0 if i < 4 else 100) for i, t in enumerate(TARGETS)}  # i0..i3 cold, hit at rank 1
    summary = lv.compare([("a", step), ("b", step)], None, popularity)
    assert summary["slices"] == {"all": 40, "cold": 4, "tail": 4}
    assert summary["steps"][0]["cold_r10_mean"] == 1.0 and summary["steps"][0]["r10_mean"] == 0.5
    assert summary["steps"][1]["minus_previous"]["tail_r10_ci"] == [0.0, 0.0]


def test_what_is_refused_names_the_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lv = _levers()
    ok = _write(tmp_path / "ok", "hymirec", {0: [1] * 40, 1: [1] * 40})
    one_seed = _write(tmp_path / "one", "hymirec", {0: [1] * 40})
    mixed = _write(tmp_path / "mixed", "hymirec", {0: [1] * 40})
    _write(mixed, "hymirec", {1: [1] * 40}, settings=("train.lr=0.002",))
    other_targets = _write(tmp_path / "split", "hymirec", {0: [1] * 40, 1: [1] * 40},
                           targets=[f"j{i}" for i in range(40)])
    other_users = _write(tmp_path / "users", "hymirec", {0: [1] * 40, 1: [1] * 40},
                         users=[f"v{i}" for i in range(40)])
    for steps, message in (([f"a={ok}", f"b={one_seed}"], "'b'.*1 result file"),
                           ([f"a={ok}", f"b={mixed}"], "'b'.*different settings"),
                           ([f"a={ok}", f"b={other_targets}"], "'b' has other test targets"),
                           ([f"a={ok}", f"b={other_users}"], "'b' was evaluated on other test users"),
                           ([f"a={ok}", f"b={ok}:bert4rec"], "unknown model 'bert4rec'"),
                           ([f"a={ok}"], "at least two --step"),
                           ([f"a={ok}", "no-equals-sign"], "expected NAME=RUNS_DIR")):
        with pytest.raises(SystemExit):
            lv.main([arg for s in steps for arg in ("--step", s)] + ["--out", str(tmp_path / "x.json")])
        err = capsys.readouterr().err
        assert __import__("re").search(message, err), (message, err)
    assert not (tmp_path / "x.json").exists()


def test_the_default_is_the_readme_table_from_the_committed_runs(tmp_path: Path) -> None:
    summary = _levers().main(["--quick", "--out", str(tmp_path / "levers.json")])
    names = [step["name"] for step in summary["steps"]]
    assert names[0] == "frozen content (defaults)" and len(names) >= 3
    by_name = {step["name"]: step for step in summary["steps"]}
    assert by_name["frozen content (defaults)"]["r10_mean"] == pytest.approx(0.1227, abs=5e-5)
    assert by_name["mlp_id, τ 0.07, lr 0.002 on a 6-epoch schedule"]["r10_mean"] == pytest.approx(0.1601, abs=5e-5)
    assert summary["reference"]["r10_mean"] == pytest.approx(0.1750, abs=5e-5)
    assert summary["command"] == "python benchmarks/levers.py"


def test_a_step_can_name_its_base(tmp_path: Path) -> None:
    """Two levers tried on the same base: each is compared with that base, not with the other."""
    lv = _levers()
    base = _write(tmp_path / "base", "hymirec", {0: [1] * 10 + [50] * 30, 1: [1] * 10 + [50] * 30})
    worse = _write(tmp_path / "worse", "hymirec", {0: [50] * 40, 1: [50] * 40})
    better = _write(tmp_path / "better", "hymirec", {0: [1] * 30 + [50] * 10, 1: [1] * 30 + [50] * 10})
    summary = lv.main(["--step", f"base={base}", "--step", f"worse={worse}", "--step", f"better={better}@base",
                       "--out", str(tmp_path / "levers.json")])
    worse_, better_ = summary["steps"][1:]
    assert worse_["previous"] == "base" and better_["previous"] == "base"
    low, high = better_["minus_previous"]["r10_ci"]
    assert low <= 0.5 <= high < 0.75  # 0.75 - 0.25 (better - base), not 0.75 - 0 (better - worse)
    assert "better (on base)" in lv.table(summary)
    with pytest.raises(ValueError, match="its base 'later' is not an earlier step"):
        lv.compare([("a", lv.per_user("a", lv.load_step("a", base, "hymirec")))] * 1
                   + [("b", lv.per_user("b", lv.load_step("b", better, "hymirec")))], None, None, {"b": "later"})
