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
    from pyspark.sql import SparkSession

    from hymirec_udfs.core.config import TrainConfig


class DistributedRunError(RuntimeError):
    """A TorchDistributor rank failed; the message carries each failing rank's error."""


class NotEnoughSlotsError(RuntimeError):
    """More training processes were asked for than the cluster can run at once."""


def training_slots(*, local_mode: bool, use_gpu: bool, driver_gpus: int, executors: int, executor_cores: int,
                   task_cpus: float, executor_gpus: float, task_gpus: float) -> Optional[int]:
    """How many TorchDistributor processes can run at once (None: no limit to check).

    A barrier stage needs every process scheduled together: on executors that is one task
    slot each (``executor cores / spark.task.cpus``, or ``executor GPUs /
    spark.task.resource.gpu.amount`` with GPUs); in local mode the processes run on the
    driver, which limits only GPUs.
    """
    if local_mode:
        return driver_gpus if use_gpu else None
    if use_gpu:
        if task_gpus <= 0:
            return 0
        return executors * int(executor_gpus // task_gpus)
    return executors * int(executor_cores // max(task_cpus, 1.0))


def _session_slots(spark: "SparkSession", local_mode: bool, use_gpu: bool) -> tuple[Optional[int], int, str]:
    """(available slots, executors, master) for TorchDistributor in this session."""
    sc = spark.sparkContext
    conf = sc.getConf()
    master = sc.master or ""
    if master.startswith("local"):
        executors, cores = 1, sc.defaultParallelism
    else:
        executors = max(1, sc._jsc.sc().getExecutorMemoryStatus().size() - 1)  # minus the driver
        cores = int(conf.get("spark.executor.cores", str(max(1, sc.defaultParallelism // executors))))
    driver_gpus = 0
    if use_gpu and local_mode:
        import torch

        driver_gpus = torch.cuda.device_count()
    available = training_slots(
        local_mode=local_mode, use_gpu=use_gpu, driver_gpus=driver_gpus, executors=executors,
        executor_cores=cores, task_cpus=float(conf.get("spark.task.cpus", "1")),
        executor_gpus=float(conf.get("spark.executor.resource.gpu.amount", "0")),
        task_gpus=float(conf.get("spark.task.resource.gpu.amount", "0")))
    return available, executors, master


def fit_to_session(spark: "SparkSession", train_cfg: "TrainConfig") -> tuple["TrainConfig", str]:
    """``train_cfg`` for a stage that trains on whatever cluster it was given (evaluate's
    baselines, ablations): with ``use_gpu`` on a session without GPU task slots (the CPU
    job cluster of a Databricks job, a CPU-only Airflow task) it trains on CPUs, with at
    most as many processes as there are task slots. Returns the settings and a note ("" when
    unchanged). The ``train`` stage itself never falls back: it fails in :func:`check_slots`.
    """
    import dataclasses

    if not train_cfg.use_gpu:
        return train_cfg, ""
    gpus, _, _ = _session_slots(spark, train_cfg.local_mode, True)
    if gpus:
        return train_cfg, ""
    cpus, _, _ = _session_slots(spark, train_cfg.local_mode, False)
    processes = train_cfg.num_processes if cpus is None else max(1, min(train_cfg.num_processes, cpus))
    note = (f"this session has no GPU task slots: trained on CPUs with {processes} process(es) instead of "
            f"train.use_gpu=true x {train_cfg.num_processes}")
    return dataclasses.replace(train_cfg, use_gpu=False, num_processes=processes), note


def check_slots(spark: "SparkSession", train_cfg: "TrainConfig") -> None:
    """Fail before training starts when ``train.num_processes`` cannot all run at once.

    Raises:
        NotEnoughSlotsError: naming the requested and available numbers and the settings
            to change (TorchDistributor would otherwise wait, then fail after its retries).
    """
    available, executors, master = _session_slots(spark, train_cfg.local_mode, train_cfg.use_gpu)
    if available is None or train_cfg.num_processes <= available:
        return
    where = ("GPUs on the driver (local_mode)" if train_cfg.local_mode else
             "concurrent GPU task slots (spark.executor/task.resource.gpu.amount)" if train_cfg.use_gpu else
             "concurrent task slots (executor cores / spark.task.cpus)")
    raise NotEnoughSlotsError(
        f"train.num_processes={train_cfg.num_processes} but the session has {available} {where} on {executors} "
        f"executor(s) (master {master}): lower train.num_processes, or add executors/GPUs"
        + ("; set spark.task.resource.gpu.amount" if train_cfg.use_gpu and not train_cfg.local_mode
           and available == 0 else ""))


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
        NotEnoughSlotsError: more processes than the session can run at once.
        DistributedRunError: a rank raised; the message names the rank and its error.
    """
    from pyspark.ml.torch.distributor import TorchDistributor
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        check_slots(active, cfg.train)
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
