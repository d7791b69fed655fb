"""Start and stop torch.distributed through DeepSpeed — the one place that reads launcher env vars.

Works the same under ``torchrun``, the ``deepspeed`` launcher and a plain single process (for which
the rendezvous variables are filled in). Without a GPU, DeepSpeed's CPU accelerator and gloo are
selected automatically.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    on_cpu: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configure_accelerator() -> bool:
    """Pick DeepSpeed's accelerator before deepspeed is imported; True when running on CPU."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    return os.environ.get("DS_ACCELERATOR") == "cpu"


def init_distributed(timeout_minutes: int | None = None) -> DistInfo:
    on_cpu = configure_accelerator()
    if "RANK" not in os.environ:  # plain `zerovl train`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    import deepspeed
    import deepspeed.ops

    if on_cpu:
        # DeepSpeed JIT-compiles a shared-memory op at init that only inference_all_reduce uses;
        # skipping it saves ~25 s of g++ per fresh machine. (Documented in shared/notes.)
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    timeout = datetime.timedelta(minutes=timeout_minutes) if timeout_minutes else None
    kwargs = {"timeout": timeout} if timeout else {}
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl", **kwargs)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_cpu:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:  # the deepspeed launcher leaves ranks to fight over cores
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    else:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    return DistInfo(rank, world, local_rank, device, on_cpu)


def barrier() -> None:
    import deepspeed.comm as dist

    dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over all ranks (one collective)."""
    import deepspeed.comm as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_floats(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's copy of a few floats, e.g. peak memory per rank."""
    import deepspeed.comm as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def all_gather_objects(obj) -> list:
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def shutdown() -> None:
    """Destroy the process group: without it gloo aborts at exit in about half the runs."""
    import deepspeed.comm as dist

    if dist.is_initialized():
        dist.destroy_process_group()
