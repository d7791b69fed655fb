"""CPU threads per rank and the one-line message for ranks that never meet, without launching ranks."""

import socket

import pytest

from zerovl.engine import distributed
from zerovl.errors import RendezvousError


@pytest.fixture
def machine(monkeypatch):
    """A host with ``cores`` cores, this process bound to ``usable`` of them, ranks on ``hosts``."""
    def configure(cores: int, usable: int, hosts: list[str]):
        monkeypatch.setattr(distributed.os, "cpu_count", lambda: cores)
        monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda _: set(range(usable)), raising=False)
        monkeypatch.setattr(distributed, "all_gather_objects", lambda _: hosts)
    return configure


def test_one_process_nodes_sharing_a_machine_share_its_cores(machine):
    """Two torchrun "nodes" on one 2-core box each see LOCAL_WORLD_SIZE=1: one thread each, not two."""
    here = socket.gethostname()
    machine(cores=2, usable=2, hosts=[here, here])
    assert distributed._threads_per_rank(2) == 1


def test_ranks_on_other_hosts_do_not_count(machine):
    machine(cores=16, usable=16, hosts=[socket.gethostname(), "node-b", "node-c", "node-d"])
    assert distributed._threads_per_rank(4) == 16
    assert distributed._threads_per_rank(1) == 16


def test_a_binding_narrower_than_the_share_wins(machine):
    """srun --cpu-bind / taskset already gave this rank its own cores."""
    here = socket.gethostname()
    machine(cores=64, usable=4, hosts=[here] * 8)
    assert distributed._threads_per_rank(8) == 4


def test_no_master_is_one_line_within_the_timeout(monkeypatch):
    monkeypatch.setattr(distributed, "RETRY_S", 0.05)
    with pytest.raises(RendezvousError) as err:
        distributed._wait_for_master("127.0.0.1", distributed._free_port(), timeout_s=0.3)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("could not reach rank 0 (the master) at 127.0.0.1:")
    assert "within 0.3 s (train.dist_timeout_s)" in message and "that every node started" in message
