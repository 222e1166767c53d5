"""Which process this is and how many there are, for work split over a torchrun launch.

Why a module of its own: ``bulkfm embed`` (and anything else that splits samples over
processes) needs the same three things, and none of them is worth a launcher of our own:
the process group that ``torchrun`` / ``accelerate launch`` describe in the environment
(set up through accelerate's :class:`~accelerate.PartialState`, which picks gloo on a
machine without CUDA and NCCL with one device per process otherwise), the contiguous row
block of each process (so gathering in rank order restores the input order), and a
gather of every block to process 0, which alone writes the output. In one plain process
all of it is a no-op: rank 0 of 1, the whole range, the array itself.

Importing this module is cheap (no torch); torch and accelerate load only under a launch.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from bulkfm.errors import BulkfmError

__all__ = [
    "ShardError",
    "gather_rows",
    "is_launched",
    "local_device",
    "process_group",
    "row_block",
    "share_error",
]


class ShardError(BulkfmError):
    """Another process of the launch failed; its message is repeated here."""


def is_launched() -> bool:
    """True under ``torchrun`` / ``accelerate launch`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_group() -> tuple[int, int]:
    """``(rank, world_size)``; under a launcher the default process group is set up first.

    accelerate's PartialState reads the launcher's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``...) and initialises ``torch.distributed`` once per process; without
    CUDA it must be told ``cpu=True`` or it would pick a backend it cannot use.
    """
    if not is_launched():
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
    return dist.get_rank(), dist.get_world_size()


def local_device(device: str) -> str:
    """``device`` for this process: a bare ``cuda`` becomes ``cuda:<LOCAL_RANK>`` under a
    launcher, so N processes on one machine use N GPUs rather than all the first one."""
    if device == "cuda" and is_launched():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def row_block(n_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of process ``rank``'s contiguous share of ``n_rows``.

    Blocks differ in size by at most one row (the first ``n_rows % world_size`` get one
    more), are disjoint, cover every row and are in rank order, so concatenating the
    results of ranks 0..N-1 gives the rows in input order. A process may get an empty
    block when there are fewer rows than processes.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} process(es)")
    base, extra = divmod(n_rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def share_error(message: str | None, rank: int, world_size: int) -> None:
    """Raise on every process when any process failed; call it on all processes.

    A process that fails alone would leave the others waiting forever in the next
    collective (a gather, a barrier); exchanging one short message first makes them all
    stop with the failing process's message, which names what to fix.
    """
    if world_size == 1:
        return
    import torch.distributed as dist

    messages: list[Any] = [None] * world_size
    dist.all_gather_object(messages, message)
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed and failed[0][0] != rank:
        r, m = failed[0]
        raise ShardError(f"process {r} of {world_size} failed: {m}")


def gather_rows(block: np.ndarray, rank: int, world_size: int) -> np.ndarray | None:
    """Every process's row block concatenated in rank order on rank 0; None elsewhere.

    Through ``torch.distributed.gather_object`` (works on gloo and NCCL). The arrays are
    pickled, so rank 0 holds the result plus one block at a time while unpickling: the
    size of the output, which rank 0 writes anyway.
    """
    if world_size == 1:
        return block
    import torch.distributed as dist

    blocks: list[Any] | None = [None] * world_size if rank == 0 else None
    dist.gather_object(block, blocks, dst=0)
    if blocks is None:
        return None
    return np.concatenate([np.asarray(b) for b in blocks], axis=0)


def barrier(world_size: int) -> None:
    """Wait for every process (no-op in one process)."""
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
