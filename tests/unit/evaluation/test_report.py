"""Unit tests for hymirec_udfs.report."""

from __future__ import annotations

import os
import pathlib
import re
from typing import Dict

import numpy as np
import pandas as pd
import pytest

from hymirec_udfs.evaluation.report import PLOT_CODEBOOK, PLOT_INTEREST_DIVERSITY, PLOT_METRICS_AT_K, PLOT_RECON_COSINE, PLOT_TRAIN_CURVES, build_report, interest_diversity

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = [
    PLOT_METRICS_AT_K,
    PLOT_CODEBOOK,
    PLOT_RECON_COSINE,
    PLOT_TRAIN_CURVES,
    PLOT_INTEREST_DIVERSITY,
]

METRICS: Dict[str, Dict[str, float]] = {
    "hymirec": {
        "recall@10": 0.28,
        "recall@50": 0.5,
        "ndcg@10": 0.16,
        "ndcg@50": 0.2,
        "mrr": 0.12,
        "users": 6040,
        "users_target_absent": 3,
    },
    "hllm <baseline>": {
        "recall@10": 0.27,
        "recall@50": 0.48,
        "ndcg@10": 0.15,
        "ndcg@50": 0.19,
    },
}


def _is_png(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(8) == PNG_MAGIC


def test_build_report_writes_every_section(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    out_dir = str(tmp_path / "report")  # does not exist yet
    path = build_report(
        out_dir,
        metrics_by_model=METRICS,
        ks=(10, 50),
        codebook_cluster_sizes=[np.array([5, 3, 0, 4]), np.array([3, 3, 3, 3])],
        recon_cosine=rng.uniform(0.7, 1.0, 200),
        train_curves={
            "train_loss": [(0, 3.0), (100, 2.1), (200, 1.7)],
            "val_ndcg@10": [(100, 0.1), (200, 0.12)],
        },
        interest_diversity=rng.uniform(-0.2, 0.9, 50),
        title="Run <42>",
        extra_tables={"Ablations": pd.DataFrame({"variant": ["full"], "r@10": [0.1]})},
    )
    assert path == os.path.join(out_dir, "index.html")
    page = open(path, encoding="utf-8").read()
    for name in ALL_PLOTS:
        assert _is_png(os.path.join(out_dir, name)), name
        # Embedded by relative path, so the folder can be moved as a whole.
        assert f'src="{name}"' in page
    assert "Skipped" not in page
    assert "Run &lt;42&gt;" in page  # title escaped
    assert "hllm &lt;baseline&gt;" in page
    assert "0.2800" in page and "6040" in page
    assert "Ablations" in page and "full" in page
    # Codebook balance of layer 1 (sizes 5, 3, 0, 4; mean 3): max/mean 1.6667, 1 empty.
    assert "1.6667" in page


def test_build_report_skips_missing_sections(tmp_path: pathlib.Path) -> None:
    out_dir = str(tmp_path)
    path = build_report(
        out_dir,
        metrics_by_model={"m": {"recall@10": 0.1, "ndcg@10": 0.05}},
        ks=(10,),
        codebook_cluster_sizes=None,
        recon_cosine=None,
        train_curves=None,
        interest_diversity=np.full(4, np.nan),  # single-interest users: nothing to show
        title="partial",
        extra_tables=None,
    )
    page = open(path, encoding="utf-8").read()
    assert _is_png(os.path.join(out_dir, PLOT_METRICS_AT_K))
    for name in ALL_PLOTS[1:]:
        assert not os.path.exists(os.path.join(out_dir, name)), name
        assert f'src="{name}"' not in page
    assert len(re.findall("Skipped:", page)) == 4
    assert "no codebook cluster sizes" in page
    assert "no reconstruction cosines" in page
    assert "no training curves" in page
    assert "no interest diversity" in page


def test_build_report_without_metrics(tmp_path: pathlib.Path) -> None:
    path = build_report(str(tmp_path), metrics_by_model={}, title="empty")
    page = open(path, encoding="utf-8").read()
    assert "no model metrics" in page
    assert not os.path.exists(os.path.join(str(tmp_path), PLOT_METRICS_AT_K))


def test_interest_diversity_hand_values() -> None:
    # User 0: (1,0), (0,2), (1,1)/sqrt2 -> pair cosines 0, 1/sqrt2, 1/sqrt2
    #         -> mean sqrt(2)/3 = 0.4714.
    # User 1: three copies of one direction -> mean 1 (collapsed interests).
    interests = np.array(
        [
            [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]],
            [[3.0, 4.0], [0.6, 0.8], [6.0, 8.0]],
        ]
    )
    np.testing.assert_allclose(
        interest_diversity(interests), [np.sqrt(2) / 3, 1.0], atol=1e-12
    )


def test_interest_diversity_single_interest_and_bad_shape() -> None:
    assert np.isnan(interest_diversity(np.ones((3, 1, 4)))).all()
    with pytest.raises(ValueError, match="shape"):
        interest_diversity(np.ones((3, 4)))
