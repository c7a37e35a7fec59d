"""The ablation variants (paper Table 4) and their comparison table.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from hymirec_udfs.core.config import Config

if TYPE_CHECKING:  # pragma: no cover

    pass


ENV_VARIANTS = "HYMIREC_ABLATION_VARIANTS"

# Variant name -> {config section: {field: value}} applied with dataclasses.replace on a
# copy of the configuration. Order and names follow the paper's Table 4 (METHOD.md).
# The ``codebook`` override of "euclidean codebook" is not a table change: the variant
# trains on an in-memory Euclidean codebook (see euclidean_item_store).
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "hymirec": {},
    "w/o lightweight recommender": {"model": {"use_light": False}},
    "w/o codebook": {"model": {"use_codebook": False}},
    "euclidean codebook": {"codebook": {"metric": "euclidean"}},
    "w/o indicator": {"model": {"use_indicator": False}},
    "w/o DMIL": {"dmil": {"enabled": False}},
    "w/o window targets": {"dmil": {"window_targets": False}},
    "max matching": {"dmil": {"matching": "max"}},
}


class AblationError(ValueError):
    """Unknown variant names, or a variant whose switches cannot be applied."""


def slug(name: str) -> str:
    """MLflow-safe variant name: lower-case letters, digits and underscores."""
    out = re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")
    if not out:
        raise AblationError(f"variant name {name!r} has no letters or digits")
    return out


def select_variants(spec: Optional[str] = None) -> list[str]:
    """Variant names to run, in :data:`VARIANTS` order.

    Args:
        spec: comma-separated names or slugs (case-insensitive); None reads
            ``HYMIREC_ABLATION_VARIANTS``; empty means every variant.

    Raises:
        AblationError: an unknown name (the known names and slugs are listed).
    """
    if spec is None:
        spec = os.environ.get(ENV_VARIANTS, "")
    wanted = [w.strip() for w in spec.split(",") if w.strip()]
    if not wanted:
        return list(VARIANTS)
    by_key = {name.lower(): name for name in VARIANTS} | {slug(name): name for name in VARIANTS}
    unknown = [w for w in wanted if w.lower() not in by_key and slug(w) not in by_key]
    if unknown:
        known = ", ".join(f"'{n}' ({slug(n)})" for n in VARIANTS)
        raise AblationError(f"unknown ablation variant(s) {unknown}; known: {known}")
    chosen = {by_key.get(w.lower()) or by_key[slug(w)] for w in wanted}
    return [name for name in VARIANTS if name in chosen]


def variant_config(cfg: Config, name: str) -> Config:
    """A copy of ``cfg`` with the variant's switches applied (``cfg`` is not changed)."""
    if name not in VARIANTS:
        raise AblationError(f"unknown ablation variant {name!r}; known: {list(VARIANTS)}")
    out = copy.deepcopy(cfg)
    for section, values in VARIANTS[name].items():
        try:
            setattr(out, section, dataclasses.replace(getattr(out, section), **values))
        except (AttributeError, TypeError) as exc:
            raise AblationError(f"variant {name!r}: cannot apply {section}={values}: {exc}") from exc
    return out


def ablation_table(rows: Sequence[Mapping[str, Any]], variants: Sequence[str], ks: Sequence[int],
                   timing: Mapping[str, Mapping[str, Any]], split: str = "test") -> str:
    """Markdown table: one row per variant (in order), R@K, N@K, steps and training time.

    Args:
        rows: ``eval_metrics`` rows (dicts) with ``model`` = variant name.
        variants: variant names in display order.
        ks: cut-offs (columns).
        timing: per variant ``train_s``, ``steps`` and ``reused`` (checkpoint reused).
        split: split shown.
    """
    header = ("| variant | " + " | ".join(f"R@{k}" for k in ks) + " | " + " | ".join(f"N@{k}" for k in ks)
              + " | steps | train s |")
    lines = [header, "|---|" + "---:|" * (2 * len(ks) + 2)]
    for name in variants:
        by_k = {r["k"]: r for r in rows if r["model"] == name and r["split"] == split}
        t = timing.get(name, {})
        cell = f"{t.get('train_s', float('nan')):.1f}" + (" (reused)" if t.get("reused") else "")
        lines.append(
            f"| {name} | " + " | ".join(_fmt(by_k.get(k), "recall") for k in ks) + " | "
            + " | ".join(_fmt(by_k.get(k), "ndcg") for k in ks) + f" | {t.get('steps', '-')} | {cell} |"
        )
    return "\n".join(lines)


def _fmt(row: Optional[Mapping[str, Any]], key: str) -> str:
    return "-" if row is None else f"{row[key]:.4f}"


def write_ablation_csv(path: Path, rows: Sequence[Mapping[str, Any]], variants: Sequence[str], ks: Sequence[int],
               timing: Mapping[str, Mapping[str, Any]], split: str = "test") -> None:
    fields = (["variant", "slug"] + [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]
              + ["mrr", "users", "steps", "epochs", "stop_reason", "train_s", "reused_checkpoint", "run_id"])
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for name in variants:
            by_k = {r["k"]: r for r in rows if r["model"] == name and r["split"] == split}
            first = next(iter(by_k.values()), {})
            t = timing.get(name, {})
            record: dict[str, Any] = {"variant": name, "slug": slug(name), "mrr": first.get("mrr"),
                                      "users": first.get("users"), "steps": t.get("steps"),
                                      "epochs": t.get("epochs"), "stop_reason": t.get("stop_reason"),
                                      "train_s": round(float(t.get("train_s", float("nan"))), 2),
                                      "reused_checkpoint": bool(t.get("reused")), "run_id": first.get("run_id")}
            for k in ks:
                record[f"recall@{k}"] = by_k[k]["recall"] if k in by_k else None
                record[f"ndcg@{k}"] = by_k[k]["ndcg"] if k in by_k else None
            writer.writerow(record)
