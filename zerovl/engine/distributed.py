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
import time
from collections import Counter
from dataclasses import dataclass

import torch

from zerovl.errors import RendezvousError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0  # train.dist_timeout_s: torch's own gloo default; DeepSpeed's is 10 min
RETRY_S = 0.25


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


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Join the process group; ``timeout_s`` (``train.dist_timeout_s``) bounds both the meeting of the
    ranks and every later collective, so slow start-up work on one rank needs a larger value."""
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
    timeout_s = timeout_s or DEFAULT_TIMEOUT_S
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not torch.distributed.is_initialized():
        _meet(deepspeed, "gloo" if on_cpu else "nccl", rank, world, timeout_s)
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_cpu:
        device = torch.device("cpu")
        threads = _threads_per_rank(world)  # every rank joins its all-gather, whatever its environment
        if "OMP_NUM_THREADS" not in os.environ:  # the deepspeed launcher leaves ranks to fight over cores
            torch.set_num_threads(threads)
    else:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    return DistInfo(rank, world, local_rank, device, on_cpu)


def _meet(deepspeed, backend: str, rank: int, world: int, timeout_s: float) -> None:
    """init_process_group, turning "the ranks never met" into one RendezvousError line.

    torch retries a missing master for the whole timeout and prints a C++ stack trace per attempt, so a
    rank that connects to the master probes the address quietly from Python first."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    hosts_store = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    if world > 1 and not hosts_store and addr and port.isdigit():  # else torch names what is missing
        _wait_for_master(addr, int(port), timeout_s)
    try:
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    except torch.distributed.DistError as e:  # DistStoreError (rank 0 waited), DistNetworkError
        raise RendezvousError(_unmet_message(addr, port, world, timeout_s, _first_line(e))) from None


def _wait_for_master(addr: str, port: int, timeout_s: float) -> None:
    """Connect to MASTER_ADDR:MASTER_PORT until it answers; masters start in any order, so retry."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((addr, port), timeout=max(0.1, min(5.0, left))):
                return
        except OSError as e:  # refused, unreachable, or a name not (yet) in DNS
            if time.monotonic() + RETRY_S >= deadline:
                raise RendezvousError(_unmet_message(addr, port, None, timeout_s, str(e) or type(e).__name__)) from None
        time.sleep(RETRY_S)


def _unmet_message(addr: str, port: int | str, world: int | None, timeout_s: float, detail: str) -> str:
    """One line naming the address, the limit and the setting behind it, torch's reason, and what to check."""
    whom = "rank 0 (the master)" if world is None else f"the other ranks of {world}"
    return (f"could not reach {whom} at {addr}:{port} within {timeout_s:g} s (train.dist_timeout_s): "
            f"{detail.rstrip('.')}; check MASTER_ADDR/MASTER_PORT and that every node started")


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _threads_per_rank(world: int) -> int:
    """CPU threads for this rank: its cores shared by the ranks on the same host.

    Counted by hostname rather than from LOCAL_WORLD_SIZE, which says 1 when several one-process
    "nodes" share a machine (a loopback multi-node test): each then took every core, and 2 such ranks on
    2 cores ran 7.5x slower per step on a test-sized model (benchmarks/RESULTS.md, "Multi-node on loopback")."""
    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores  # srun/taskset binding
    on_host = Counter(all_gather_objects(socket.gethostname()))[socket.gethostname()] if world > 1 else 1
    return max(1, min(usable, cores // on_host))


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
