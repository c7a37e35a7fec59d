"""DDP process plumbing: process-group setup and teardown, collectives, rank shards.

:func:`ddp_process` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` /
``MASTER_PORT`` as TorchDistributor (or torchrun) sets them; without ``WORLD_SIZE`` it runs
single-process with no process group. gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch

from hymirec_udfs.core.config import TrainConfig


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


@contextlib.contextmanager
def ddp_process(train_cfg: TrainConfig) -> Iterator[tuple[int, int, torch.device]]:
    """Set up this process as one DDP rank (from TorchDistributor/torchrun's environment).

    Picks the device (the local GPU with ``train.use_gpu``), joins the process group
    (gloo on CPU, nccl on GPU) unless one exists, and sets the torch thread count; all of
    it is undone on exit, because the caller's process may go on (tests, single-process).

    Yields:
        ``(rank, world_size, device)``.
    """
    import torch.distributed as dist

    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if train_cfg.use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("train.use_gpu is true but CUDA is not available")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    own_group = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if train_cfg.use_gpu else "gloo", rank=rank, world_size=world)
        own_group = True
    prev_threads = torch.get_num_threads()
    # Oversubscribed OpenMP threads spin against each other: on a busy 2-core machine a
    # tiny matmul went from 2 ms to 100 ms with 2 threads instead of 1.
    torch.set_num_threads(train_cfg.torch_threads or max(1, (os.cpu_count() or 1) // max(1, local_world)))
    try:
        yield rank, world, device
    finally:
        torch.set_num_threads(prev_threads)
        if own_group:
            dist.destroy_process_group()


def all_reduce_(tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
    """In-place all-reduce (SUM by default) across ranks; a no-op in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def all_gather_obj(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (``[obj]`` in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
