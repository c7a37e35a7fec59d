"""benchmarks/scale.py's measuring pieces: the process-tree sampler and the flat result."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.bench_modules import load_benchmark

pytest.importorskip("psutil")


def _scale():
    return load_benchmark("scale")


def test_sampler_sees_a_child_rank_allocating_memory() -> None:
    scale = _scale()
    # a stand-in for `python -m torch.distributed.run` and its rank: the launcher role is
    # told by the command line, the rank by its parent
    rank = "import time; b = bytearray(300 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); time.sleep(3)"
    launcher = (f"import subprocess, sys; subprocess.run([sys.executable, '-c', {rank!r}])  # torch.distributed.run")
    with scale.TreeSampler(interval_s=0.1) as sampler:
        proc = subprocess.Popen([sys.executable, "-c", launcher])
        time.sleep(2.5)
        proc.wait()
    assert sampler.peak["rank"] > 290, sampler.peak  # the rank's 300 MB, not the launcher's
    # the tree's total holds the rank (the driver's own peak may fall in another sample)
    assert sampler.peak["total"] >= sampler.peak["rank"]


def _size(items: int, walls: dict[str, float], rank_mb: float) -> dict:
    out = {"items": items, "users": items // 4, "interactions": items * 10}
    for stage, wall in walls.items():
        out[stage] = {"wall_s": wall, "table_bytes": items * 100,
                      **{f"peak_rss_mb_{r}": 100.0 for r in ("driver", "jvm", "workers", "total")},
                      **{f"peak_private_mb_{r}": 50.0 for r in ("driver", "jvm", "workers")},
                      "peak_rss_mb_rank": rank_mb if stage in ("train", "evaluate") else 0.0,
                      "peak_private_mb_rank": rank_mb / 2 if stage in ("train", "evaluate") else 0.0}
    for stage, users in (("evaluate", 2000), ("recommend", items // 4)):
        out[stage].update(pairs=users * items, pairs_per_s=users * items / walls[stage])
    return out


def test_flat_result_exponents_and_goals() -> None:
    scale = _scale()
    small = _size(50_000, {"ingest": 10.0, "train": 30.0, "evaluate": 20.0, "recommend": 10.0}, rank_mb=1000.0)
    large = _size(200_000, {"ingest": 40.0, "train": 30.0, "evaluate": 160.0, "recommend": 160.0}, rank_mb=1100.0)
    flat = scale.flatten([small, large])
    assert flat["exponent_ingest"] == pytest.approx(1.0)  # 4x the wall on 4x the data
    assert flat["exponent_train"] == pytest.approx(0.0)
    assert flat["exponent_evaluate"] == pytest.approx(1.5)  # pair stages are exempt from the goal
    assert flat["exponent_per_pair_evaluate"] == pytest.approx(0.5)  # 4x the pairs, 8x the wall
    assert flat["exponent_recommend"] == pytest.approx(2.0)  # 4x users x 4x items
    assert flat["exponent_per_pair_recommend"] == pytest.approx(0.0)
    assert flat["pairs_per_s_recommend_200k"] == pytest.approx(50_000 * 200_000 / 160.0)
    assert flat["wall_s_ingest_200k"] == 40.0 and flat["peak_rss_mb_train_50k"] == 100.0
    assert flat["rank_rss_ratio"] == pytest.approx(1.1) and flat["rank_private_ratio"] == pytest.approx(1.1)
    assert flat["goals_met"] and flat["stages_over_exponent_goal"] == ""

    quadratic = _size(200_000, {"ingest": 160.0, "train": 30.0, "evaluate": 160.0, "recommend": 160.0},
                      rank_mb=1500.0)
    flat = scale.flatten([small, quadratic])
    assert flat["stages_over_exponent_goal"] == "ingest" and flat["rank_rss_ratio"] == pytest.approx(1.5)
    assert not flat["goals_met"]
    rendered = scale.table(flat, [50_000, 200_000])
    assert "| ingest | 10.0 | 160.0 | 2.00 |" in rendered
    assert "| train | 30.0 | 30.0 | 0.00 | 100 | 100 | 100 → 100 | 1,000 → 1,500 (500 → 750) |" in rendered
