"""The slot check before distributed training: requested processes vs what can run at once."""

from __future__ import annotations

import dataclasses

import pytest

from hymirec_udfs.core.config import TrainConfig
from hymirec_udfs.training.launch import NotEnoughSlotsError, check_slots, training_slots

BASE = dict(local_mode=False, use_gpu=False, driver_gpus=0, executors=2, executor_cores=4, task_cpus=1.0,
            executor_gpus=0.0, task_gpus=0.0)


@pytest.mark.parametrize("change,slots", [
    ({}, 8),                                                     # 2 executors x 4 cores
    ({"task_cpus": 2.0}, 4),                                     # spark.task.cpus=2 halves them
    ({"use_gpu": True, "executor_gpus": 1.0, "task_gpus": 1.0}, 2),  # one GPU per worker (Databricks dev)
    ({"use_gpu": True, "executor_gpus": 1.0, "task_gpus": 0.0}, 0),  # no spark.task.resource.gpu.amount
    ({"local_mode": True}, None),                                # CPU processes on the driver: no limit
    ({"local_mode": True, "use_gpu": True, "driver_gpus": 1}, 1),
])
def test_training_slots(change: dict, slots) -> None:
    assert training_slots(**{**BASE, **change}) == slots


@pytest.mark.spark
def test_check_names_both_numbers_and_the_setting(spark) -> None:
    cores = spark.sparkContext.defaultParallelism
    fits = dataclasses.replace(TrainConfig(), num_processes=cores, local_mode=False)
    check_slots(spark, fits)
    too_many = dataclasses.replace(fits, num_processes=cores + 3)
    with pytest.raises(NotEnoughSlotsError,
                       match=rf"train\.num_processes={cores + 3} but the session has {cores} concurrent task slots"):
        check_slots(spark, too_many)
    check_slots(spark, dataclasses.replace(too_many, local_mode=True))  # on the driver: fine on CPU


@pytest.mark.spark
def test_gpu_settings_on_a_session_without_gpu_slots_fall_back_to_cpu_for_baselines(spark) -> None:
    """evaluate (CPU cluster) trains its baselines with train.use_gpu=true: before, the
    barrier stage was refused (no spark.task.resource.gpu.amount); now they train on CPUs,
    with no more processes than the session's task slots, and the summary says so."""
    from hymirec_udfs.training.launch import fit_to_session

    cores = spark.sparkContext.defaultParallelism
    gpu = dataclasses.replace(TrainConfig(), use_gpu=True, local_mode=False, num_processes=cores + 2)
    with pytest.raises(NotEnoughSlotsError, match="0 concurrent GPU task slots.*set spark.task.resource.gpu.amount"):
        check_slots(spark, gpu)  # the train stage itself never falls back
    fitted, note = fit_to_session(spark, gpu)
    assert (fitted.use_gpu, fitted.num_processes, fitted.local_mode) == (False, cores, False)
    assert note.startswith("this session has no GPU task slots: trained on CPUs with")
    check_slots(spark, fitted)
    cpu = dataclasses.replace(TrainConfig(), use_gpu=False)
    assert fit_to_session(spark, cpu) == (cpu, "")
