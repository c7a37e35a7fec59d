"""The embedding pandas UDF: one cached :class:`ContentEncoder` per Python worker.

The UDF is built from keyword settings (a model *factory*, as ``predict_batch_udf`` does)
and caches the encoder per worker process under those settings, so a task pays the model
load once; on GPU executors each task uses the GPU Spark assigned it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Tuple

import pandas as pd

from hymirec_udfs.embedding.encoder import ContentEncoder

if TYPE_CHECKING:
    pass


_ENCODER_CACHE: dict[tuple[Any, ...], "ContentEncoder"] = {}
_ENCODER_CACHE_LOCK = threading.Lock()


def resolve_task_device(device: str = "auto") -> str:
    """Pick the GPU Spark assigned to the current task, when there is one.

    With GPU scheduling each task carries ``resources()["gpu"]``; binding the
    worker's model to that address gives one model per GPU instead of every
    worker piling onto ``cuda:0``.

    Args:
        device: the requested device; ``auto`` or ``cuda`` follow the task's GPU,
            anything else (``cpu``, ``cuda:1``) is kept.

    Returns:
        ``cuda:<address>`` under a task with a GPU, otherwise ``device``.
    """
    if device not in ("auto", "cuda"):
        return device
    from pyspark import TaskContext

    context = TaskContext.get()
    if context is None:
        return device
    gpu = context.resources().get("gpu")
    if gpu is None or not gpu.addresses:
        return device
    return f"cuda:{gpu.addresses[0]}"


def _task_cpus() -> int | None:
    """CPUs Spark gave the current task (None outside a task)."""
    from pyspark import TaskContext

    context = TaskContext.get()
    return None if context is None else int(context.cpus())


def get_cached_encoder(**settings: Any) -> ContentEncoder:
    """Return this process's encoder for the given settings, loading it once.

    Spark reuses Python workers across tasks, so the model is loaded once per
    worker. Inside a task the device follows the task's GPU (see
    :func:`resolve_task_device`) and, on CPU, ``num_threads`` defaults to the
    task's ``spark.task.cpus`` so concurrent workers do not oversubscribe cores.

    Args:
        **settings: keyword arguments of :class:`ContentEncoder`.

    Returns:
        The cached encoder.
    """
    settings = dict(settings)
    settings["device"] = resolve_task_device(settings.get("device", "auto"))
    if settings.get("num_threads") is None:
        settings["num_threads"] = _task_cpus()
    key = tuple(sorted(settings.items()))
    with _ENCODER_CACHE_LOCK:
        encoder = _ENCODER_CACHE.get(key)
        if encoder is None:
            encoder = ContentEncoder(**settings)
            _ENCODER_CACHE[key] = encoder
    return encoder


def make_embed_udf(**settings: Any) -> Callable[..., Any]:
    """Build the Spark pandas UDF ``(item_id, text) -> array<float>``.

    The closure holds only ``settings`` (plain values), so the pickled UDF is a
    few kilobytes; each Python worker loads the model on first use through
    :func:`get_cached_encoder` and keeps it for later tasks.

    Args:
        **settings: keyword arguments of :class:`ContentEncoder`
            (``model_path`` required).

    Returns:
        An iterator-of-series pandas UDF taking the item id and text columns.

    Raises:
        ValueError: ``model_path`` missing.
    """
    if "model_path" not in settings:
        raise ValueError("make_embed_udf needs model_path")
    from pyspark.sql.functions import pandas_udf

    frozen_settings = dict(settings)

    def embed(batches: Iterator[Tuple[pd.Series, pd.Series]]) -> Iterator[pd.Series]:
        encoder = get_cached_encoder(**frozen_settings)
        for item_ids, texts in batches:
            embeddings = encoder.predict(texts.tolist(), ids=item_ids.tolist())
            yield pd.Series(list(embeddings))

    return pandas_udf(embed, returnType="array<float>")
