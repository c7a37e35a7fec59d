"""Codebook (de)serialisation: ``codebooks`` table rows and ``.npz`` artefacts.

Rows carry one centroid each (version, layer, code); :func:`codebook_from_rows` checks that
every layer is complete and the widths agree, naming the first bad row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from hymirec_udfs.codebook.blocks import ROWS_QUOTED, CodebookInputError, parse_metric
from hymirec_udfs.codebook.residual import FitReport, ResidualCodebook

_NPZ_FORMAT_VERSION = 1


def codebook_to_rows(
    codebook: ResidualCodebook,
    version: str,
    fit_report: FitReport | None,
) -> list[dict[str, Any]]:
    """One row per centroid for the ``codebooks`` table.

    Args:
        codebook: the codebook.
        version: codebook version written to every row.
        fit_report: supplies ``cluster_size_at_fit``; None writes -1 (e.g. a codebook
            rebuilt from an artifact).

    Returns:
        Dicts with ``version``, ``layer`` (0-based, the codes column), ``code``,
        ``centroid`` (list of float), ``metric``, ``cluster_size_at_fit``.
    """
    rows: list[dict[str, Any]] = []
    for layer, centroids in enumerate(codebook.centroids):
        sizes = fit_report.layers[layer].cluster_sizes if fit_report is not None else None
        values = centroids.detach().to("cpu", torch.float32).numpy()
        for code in range(values.shape[0]):
            rows.append(
                {
                    "version": version,
                    "layer": layer,
                    "code": code,
                    "centroid": values[code].tolist(),
                    "metric": str(codebook.metric),
                    "cluster_size_at_fit": int(sizes[code]) if sizes is not None else -1,
                }
            )
    return rows


def codebook_from_rows(rows: Iterable[Mapping[str, Any]]) -> ResidualCodebook:
    """Rebuild a codebook from :func:`codebook_to_rows` output (dicts or Spark Rows).

    Args:
        rows: rows of exactly one codebook version, in any order.

    Returns:
        The codebook, centroids as float32 on CPU.

    Raises:
        CodebookInputError: no rows, several versions or metrics, missing or duplicate
            codes, or centroids of different dimensions.
    """
    rows = list(rows)
    if not rows:
        raise CodebookInputError("no codebook rows")
    versions = {str(row["version"]) for row in rows}
    if len(versions) != 1:
        raise CodebookInputError(f"rows mix codebook versions {sorted(versions)}")
    metrics = {str(row["metric"]) for row in rows}
    if len(metrics) != 1:
        raise CodebookInputError(f"rows mix metrics {sorted(metrics)}")
    by_layer: dict[int, dict[int, list[float]]] = {}
    for row in rows:
        layer, code = int(row["layer"]), int(row["code"])
        codes = by_layer.setdefault(layer, {})
        if code in codes:
            raise CodebookInputError(f"duplicate row for layer {layer} code {code}")
        codes[code] = list(row["centroid"])
    if sorted(by_layer) != list(range(len(by_layer))):
        raise CodebookInputError(f"layers {sorted(by_layer)} are not 0..{len(by_layer) - 1}")
    centroids: list[torch.Tensor] = []
    for layer in range(len(by_layer)):
        codes = by_layer[layer]
        if sorted(codes) != list(range(len(codes))):
            missing = sorted(set(range(max(codes) + 1)) - set(codes))
            raise CodebookInputError(f"layer {layer} is missing codes {missing[:ROWS_QUOTED]}")
        centroids.append(torch.tensor([codes[c] for c in range(len(codes))], dtype=torch.float32))
    dims = {int(c.shape[1]) for c in centroids}
    if len(dims) != 1:
        raise CodebookInputError(f"centroids have different dimensions across layers: {sorted(dims)}")
    return ResidualCodebook(centroids=centroids, metric=parse_metric(metrics.pop()), dim=dims.pop())


def save_npz(codebook: ResidualCodebook, path: str | Path) -> None:
    """Write the codebook as a compressed ``.npz`` (the MLflow artifact).

    Args:
        codebook: the codebook.
        path: destination file.
    """
    arrays: dict[str, np.ndarray] = {
        "format_version": np.array(_NPZ_FORMAT_VERSION),
        "metric": np.array(str(codebook.metric)),
        "dim": np.array(codebook.dim),
        "num_layers": np.array(codebook.num_layers),
    }
    for layer, c in enumerate(codebook.centroids):
        arrays[f"centroids_{layer}"] = c.detach().to("cpu", torch.float32).numpy()
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def load_npz(path: str | Path) -> ResidualCodebook:
    """Read a codebook written by :func:`save_npz`.

    Args:
        path: the ``.npz`` file.

    Returns:
        The codebook, centroids as float32 on CPU.

    Raises:
        CodebookInputError: a file of another format version.
    """
    with np.load(path, allow_pickle=False) as data:
        version = int(data["format_version"])
        if version != _NPZ_FORMAT_VERSION:
            raise CodebookInputError(
                f"{path}: codebook format version {version}, this code reads {_NPZ_FORMAT_VERSION}"
            )
        num_layers = int(data["num_layers"])
        centroids = [torch.from_numpy(data[f"centroids_{layer}"].copy()) for layer in range(num_layers)]
        return ResidualCodebook(centroids=centroids, metric=parse_metric(str(data["metric"])), dim=int(data["dim"]))
