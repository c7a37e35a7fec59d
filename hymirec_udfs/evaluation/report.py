"""Static HTML evaluation report: metric curves, codebook health, training curves.

:func:`build_report` writes PNG plots and an ``index.html`` that embeds them by relative
path, so the output folder can be copied, attached to an MLflow run or served as is.
Matplotlib is imported lazily and drives the Agg canvas directly (no ``pyplot``), so the
report works headless, on executors, and without touching a global backend that a
notebook may have chosen.

:func:`print_latest` prints the latest ``eval_metrics`` rows and the report path
(``hymirec report``).
"""

from __future__ import annotations

import html
import math
import os
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from hymirec_udfs.evaluation.metrics import DEFAULT_KS

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from matplotlib.figure import Figure
import json
from typing import TYPE_CHECKING

from hymirec_udfs.core import schemas
from hymirec_udfs.core.config import Config
from hymirec_udfs.core.lineage import last_success

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from pyspark.sql import SparkSession


REPORT_HTML = "index.html"
PLOT_METRICS_AT_K = "metrics_at_k.png"
PLOT_CODEBOOK = "codebook_cluster_sizes.png"
PLOT_RECON_COSINE = "recon_cosine.png"
PLOT_TRAIN_CURVES = "train_curves.png"
PLOT_INTEREST_DIVERSITY = "interest_diversity.png"
_DPI = 100
_HIST_BINS = 50
_NORM_EPS = 1e-12


def interest_diversity(interests: Union[np.ndarray, "torch.Tensor"]) -> np.ndarray:
    """Per-user mean pairwise cosine similarity of the interest vectors.

    Low values mean the interests point in different directions (disentangled); values
    near 1 mean the model collapsed them into one, which DMIL is meant to prevent.

    Args:
        interests: ``(U, s, D)`` interest embeddings (normalised here).

    Returns:
        float64 array ``(U,)``; NaN for every user when ``s < 2`` (no pairs).

    Raises:
        ValueError: if ``interests`` is not 3-D.
    """
    arr = np.asarray(
        interests.detach().cpu().numpy() if hasattr(interests, "detach") else interests,
        dtype=np.float64,
    )
    if arr.ndim != 3:
        raise ValueError(f"interests must be (U, s, D), got shape {arr.shape}")
    n_users, n_interests, _ = arr.shape
    if n_interests < 2:
        return np.full(n_users, np.nan)
    unit = arr / np.maximum(np.linalg.norm(arr, axis=-1, keepdims=True), _NORM_EPS)
    gram = np.einsum("usd,utd->ust", unit, unit)
    upper = np.triu_indices(n_interests, k=1)
    return gram[:, upper[0], upper[1]].mean(axis=1)


def build_report(
    out_dir: str,
    *,
    metrics_by_model: Mapping[str, Mapping[str, float]],
    ks: Sequence[int] = DEFAULT_KS,
    codebook_cluster_sizes: Optional[Sequence[np.ndarray]] = None,
    recon_cosine: Optional[np.ndarray] = None,
    train_curves: Optional[Mapping[str, Sequence[Tuple[int, float]]]] = None,
    interest_diversity: Optional[np.ndarray] = None,
    title: str = "HyMiRec evaluation",
    extra_tables: Optional[Mapping[str, "pd.DataFrame"]] = None,
) -> str:
    """Write the plots and ``index.html`` of an evaluation run.

    Every section whose input is ``None`` (or empty) is skipped and the HTML says so,
    so a partial run still yields a readable report.

    Args:
        out_dir: folder to write into (created if missing); existing files of the same
            names are overwritten.
        metrics_by_model: model name -> metrics as returned by
            :func:`hymirec_udfs.evaluation.metrics.metrics_from_ranks` (keys ``"recall@K"``,
            ``"ndcg@K"``, optionally ``"mrr"``, ``"users"``, ...).
        ks: cut-offs plotted on the Recall@K / NDCG@K curves.
        codebook_cluster_sizes: per codebook layer, the member count of each centroid.
        recon_cosine: per item, cosine between the embedding and its codebook
            reconstruction.
        train_curves: curve name (e.g. ``"train_loss"``, ``"val_ndcg@10"``) -> list of
            ``(step, value)``.
        interest_diversity: per user, mean pairwise cosine of the interests (see
            :func:`interest_diversity`).
        title: page title.
        extra_tables: caption -> DataFrame, appended as HTML tables.

    Returns:
        Path of the written ``index.html``.
    """
    os.makedirs(out_dir, exist_ok=True)
    sections: List[str] = []

    sections.append(_section_metrics(out_dir, metrics_by_model, ks))
    sections.append(_section_codebook(out_dir, codebook_cluster_sizes))
    sections.append(_section_recon(out_dir, recon_cosine))
    sections.append(_section_train_curves(out_dir, train_curves))
    sections.append(_section_diversity(out_dir, interest_diversity))
    if extra_tables:
        for caption, frame in extra_tables.items():
            sections.append(
                f"<h2>{html.escape(str(caption))}</h2>\n"
                + frame.to_html(border=0, classes="table", float_format=_fmt_float)
            )

    page = _PAGE.format(title=html.escape(title), body="\n".join(sections))
    path = os.path.join(out_dir, REPORT_HTML)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(page)
    return path


def _section_metrics(
    out_dir: str, metrics_by_model: Mapping[str, Mapping[str, float]], ks: Sequence[int]
) -> str:
    head = "<h2>Retrieval metrics</h2>\n"
    if not metrics_by_model:
        return head + _skipped("no model metrics were given")
    ks = [int(k) for k in ks]
    columns = [f"{name}@{k}" for name in ("recall", "ndcg") for k in ks]
    for metrics in metrics_by_model.values():
        columns.extend(key for key in metrics if key not in columns)
    rows = [
        [model] + [metrics.get(column) for column in columns]
        for model, metrics in metrics_by_model.items()
    ]
    table = _html_table(["model"] + columns, rows)

    fig = _new_figure(ncols=2, width=11.0, height=4.0)
    for ax, name, label in zip(fig.axes, ("recall", "ndcg"), ("Recall@K", "NDCG@K")):
        for model, metrics in metrics_by_model.items():
            values = [_as_float(metrics.get(f"{name}@{k}")) for k in ks]
            ax.plot(ks, values, marker="o", label=model)
        ax.set_xlabel("K")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize="small")
    return head + table + _save(fig, out_dir, PLOT_METRICS_AT_K, "Recall@K and NDCG@K")


def _section_codebook(out_dir: str, sizes: Optional[Sequence[np.ndarray]]) -> str:
    head = "<h2>Codebook cluster sizes</h2>\n"
    if sizes is None or len(sizes) == 0:
        return head + _skipped("no codebook cluster sizes were given")
    layers = [np.asarray(layer, dtype=np.float64).reshape(-1) for layer in sizes]
    rows: List[List[object]] = []
    fig = _new_figure(ncols=len(layers), width=4.5 * len(layers), height=3.5)
    for level, (ax, layer) in enumerate(zip(fig.axes, layers), start=1):
        if layer.size == 0:
            ax.set_title(f"layer {level}: empty")
            rows.append([level, 0, 0, None, None, 0, None])
            continue
        mean = float(layer.mean())
        # max/mean and the coefficient of variation are the balance the paper's
        # capacity-constrained k-means promises; empty centroids are wasted codes.
        balance = float(layer.max()) / mean if mean > 0 else math.nan
        cv = float(layer.std()) / mean if mean > 0 else math.nan
        empty = int(np.count_nonzero(layer == 0))
        smallest = float(layer.min())
        rows.append([level, layer.size, int(layer.sum()), balance, cv, empty, smallest])
        ordered = np.sort(layer)[::-1]
        ax.bar(np.arange(ordered.size), ordered, width=1.0)
        ax.axhline(mean, color="red", linestyle="--", linewidth=1, label="mean")
        ax.set_title(f"layer {level}: max/mean {balance:.2f}, empty {empty}")
        ax.set_xlabel("centroid (sorted by size)")
        ax.set_ylabel("members")
        ax.legend(fontsize="small")
    table = _html_table(
        ["layer", "centroids", "members", "max/mean", "cv", "empty", "min size"], rows
    )
    return head + table + _save(fig, out_dir, PLOT_CODEBOOK, "codebook cluster sizes")


def _section_recon(out_dir: str, recon_cosine: Optional[np.ndarray]) -> str:
    head = "<h2>Codebook reconstruction cosine</h2>\n"
    values = _finite(recon_cosine)
    if values is None:
        return head + _skipped("no reconstruction cosines were given")
    stats = _summary(values)
    fig = _new_figure(ncols=1, width=6.0, height=3.5)
    ax = fig.axes[0]
    ax.hist(values, bins=_HIST_BINS)
    ax.axvline(stats["mean"], color="red", linestyle="--", linewidth=1, label="mean")
    ax.axvline(stats["p5"], color="orange", linestyle=":", linewidth=1, label="p5")
    ax.set_xlabel("cos(e, reconstruction)")
    ax.set_ylabel("items")
    ax.legend(fontsize="small")
    table = _html_table(list(stats), [list(stats.values())])
    plot = _save(fig, out_dir, PLOT_RECON_COSINE, "reconstruction cosine")
    return head + table + plot


def _section_train_curves(
    out_dir: str, curves: Optional[Mapping[str, Sequence[Tuple[int, float]]]]
) -> str:
    head = "<h2>Training curves</h2>\n"
    curves = {name: sorted(points) for name, points in (curves or {}).items() if points}
    if not curves:
        return head + _skipped("no training curves were given")
    # One panel per curve: a loss and a ranking metric do not share a scale.
    fig = _new_figure(ncols=len(curves), width=4.5 * len(curves), height=3.5)
    for ax, (name, points) in zip(fig.axes, curves.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 50 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    rows = [
        [name, len(points), points[-1][0], points[-1][1]]
        for name, points in curves.items()
    ]
    table = _html_table(["curve", "points", "last step", "last value"], rows)
    return head + table + _save(fig, out_dir, PLOT_TRAIN_CURVES, "training curves")


def _section_diversity(out_dir: str, diversity: Optional[np.ndarray]) -> str:
    head = "<h2>Interest diversity</h2>\n"
    values = _finite(diversity)
    if values is None:
        return head + _skipped(
            "no interest diversity was given (or every user has a single interest)"
        )
    stats = _summary(values)
    fig = _new_figure(ncols=1, width=6.0, height=3.5)
    ax = fig.axes[0]
    ax.hist(values, bins=_HIST_BINS)
    ax.axvline(stats["mean"], color="red", linestyle="--", linewidth=1, label="mean")
    ax.set_xlabel("mean pairwise cosine of a user's interests")
    ax.set_ylabel("users")
    ax.legend(fontsize="small")
    table = _html_table(list(stats), [list(stats.values())])
    return head + table + _save(
        fig, out_dir, PLOT_INTEREST_DIVERSITY, "interest diversity"
    )


def _new_figure(*, ncols: int, width: float, height: float) -> "Figure":
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    fig.subplots(1, ncols, squeeze=False)
    return fig


def _save(fig: "Figure", out_dir: str, name: str, alt: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=_DPI)
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(alt)}"></p>\n'


def _skipped(reason: str) -> str:
    return f'<p class="skipped">Skipped: {html.escape(reason)}.</p>\n'


def _finite(values: Optional[np.ndarray]) -> Optional[np.ndarray]:
    if values is None:
        return None
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    arr = arr[np.isfinite(arr)]
    return arr if arr.size else None


def _summary(values: np.ndarray) -> Dict[str, float]:
    return {
        "count": int(values.size),
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "p5": float(np.percentile(values, 5)),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def _as_float(value: Optional[float]) -> float:
    return math.nan if value is None else float(value)


def _fmt_float(value: float) -> str:
    return f"{value:.4f}"


def _fmt_cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else _fmt_float(float(value))
    return html.escape(str(value))


def _html_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt_cell(cell)}</td>" for cell in row) + "</tr>\n"
        for row in rows
    )
    return f'<table class="table">\n<tr>{head}</tr>\n{body}</table>\n'


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table.table {{ border-collapse: collapse; margin: 0.5em 0 1em 0; }}
table.table td, table.table th {{ border: 1px solid #ccc; padding: 0.25em 0.6em;
  text-align: right; }}
p.skipped {{ color: #777; font-style: italic; }}
img {{ max-width: 100%; }}
</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""


def print_latest(spark: "SparkSession", cfg: Config) -> str:
    """The latest evaluation's test metrics (Markdown) and report path, for ``hymirec report``."""
    from hymirec_udfs.core.tables import get_table_store

    store = get_table_store(spark, cfg)
    last = last_success(store, "evaluate")
    if last is None or not store.exists(schemas.EVAL_METRICS):
        return "no evaluation yet: run `hymirec evaluate` (or `hymirec pipeline run`)"
    summary = json.loads(last["summary"] or "{}")
    lines = [f"evaluation run {last['run_id']} ({last['started_at']:%Y-%m-%d %H:%M}), split test, full-catalog ranking,"
             f" history excluded={cfg.evaluate.exclude_history}, merge={cfg.evaluate.merge}:", ""]
    lines.append(summary.get("metrics_table", "(no table)"))
    lines += ["", f"report: {summary.get('report', '-')}"]
    return "\n".join(lines)
