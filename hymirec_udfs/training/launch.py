"""Run a function on TorchDistributor ranks and bring back rank 0's result.

Each rank runs ``module:function(**kwargs)``; a rank that raises writes its error next to
the result file so the driver reports the real cause (TorchDistributor only says that a
child failed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from hymirec_udfs.core.config import Config

if TYPE_CHECKING:  # pragma: no cover

    pass


class DistributedRunError(RuntimeError):
    """A TorchDistributor rank failed; the message carries each failing rank's error."""


def _entry(target: str, kwargs: dict[str, Any], result_path: str) -> Optional[dict[str, Any]]:
    """What each TorchDistributor process runs: ``target(**kwargs)``; rank 0 writes the result.

    A rank that raises writes its error next to the result, so the driver can report the
    real cause (TorchDistributor itself only says that a child failed).
    """
    import importlib

    module, name = target.split(":")
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = getattr(importlib.import_module(module), name)(**kwargs)
    except BaseException as exc:
        Path(f"{result_path}.rank{rank}.error").write_text(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise
    if rank == 0:
        Path(result_path).write_text(json.dumps(result, default=str))
    return result


def run_distributed(target: str, kwargs: dict[str, Any], run_dir: Path, cfg: Config) -> dict[str, Any]:
    """Run ``module:function(**kwargs)`` on ``train.num_processes`` TorchDistributor ranks.

    Returns:
        Rank 0's result (a JSON-serialisable dict).

    Raises:
        DistributedRunError: a rank raised; the message names the rank and its error.
    """
    from pyspark.ml.torch.distributor import TorchDistributor

    result_path = run_dir / "result.json"
    for stale in run_dir.glob("result.json*"):
        stale.unlink()
    try:
        TorchDistributor(
            num_processes=cfg.train.num_processes, local_mode=cfg.train.local_mode, use_gpu=cfg.train.use_gpu
        ).run(_entry, target, kwargs, str(result_path))
    except Exception as exc:
        errors = sorted(run_dir.glob("result.json.rank*.error"))
        if errors:
            raise DistributedRunError("; ".join(e.read_text() for e in errors)) from exc
        raise
    return json.loads(result_path.read_text())
