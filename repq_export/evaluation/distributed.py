"""Evaluation across processes and machines (torchrun): one calibration, a shard of the images per
process, the results gathered on rank 0 and scored once, so the metrics equal a single process's.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK and the rendezvous; gloo carries the objects on the CPU,
nccl on GPUs. Only Python objects travel (the quantization state as its saved file's bytes, the
detections of each image), never the images.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str) -> ProcessGroup | None:
    """Join the job torchrun describes in the environment; None for a plain single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), local_rank)


def close(group: ProcessGroup | None) -> None:
    """Leave the job (every rank, once its part is done)."""
    if group is not None and dist.is_initialized():
        dist.destroy_process_group()


def shard(count: int, group: ProcessGroup | None) -> list[int]:
    """The dataset indices this process runs: every world_size-th, starting at its rank."""
    return list(range(count)) if group is None else list(range(group.rank, count, group.world_size))


def _broadcast(obj, group: ProcessGroup):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shared_quant_model(make: Callable[[], nn.Module], detector: nn.Module, group: ProcessGroup | None) -> nn.Module:
    """Rank 0 builds the fake-quant model (`make`: calibrate or --load-quant) and sends its saved state; every
    other rank loads that state into its float `detector`. A UserError on rank 0 ends every rank."""
    from ..quant.state import load_quant_state, save_quant_state

    if group is None:
        return make()
    if group.is_main:
        try:
            qmodel = make()
            with tempfile.TemporaryDirectory() as tmp:
                save_quant_state(qmodel, Path(tmp) / "quant.pth")
                payload = ("state", (Path(tmp) / "quant.pth").read_bytes())
        except UserError as exc:
            _broadcast(("error", str(exc)), group)
            raise
        _broadcast(payload, group)
        return qmodel
    kind, data = _broadcast(None, group)
    if kind == "error":
        raise UserError(f"rank 0 stopped: {data}")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "quant.pth").write_bytes(data)
        return load_quant_state(detector, Path(tmp) / "quant.pth")


def gather_to_main(items: list, group: ProcessGroup | None) -> list | None:
    """Every rank's `items` (or the UserError that stopped it) on rank 0, in rank order; None elsewhere.

    A rank that failed sends its error instead of results, so no rank waits forever; rank 0 then
    raises it for the job.
    """
    if group is None:
        return [items]
    received = [None] * group.world_size if group.is_main else None
    dist.gather_object(items, received, dst=0)
    if not group.is_main:
        return None
    for rank, part in enumerate(received):
        if isinstance(part, str):
            raise UserError(f"rank {rank} failed: {part}")
    return received
