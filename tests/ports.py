"""Multi-process tests: a free local TCP port for the rendezvous, and ranks spawned under a deadline."""

import socket
import time
from collections.abc import Callable

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(rank_main: Callable[..., None], args: tuple, world: int, timeout_s: float) -> None:
    """Spawn `rank_main(rank, *args)` on `world` ranks; fail (and kill them) if they are not all done
    within `timeout_s`: a hang shows as a failure, not a stuck test run."""
    context = mp.start_processes(rank_main, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {timeout_s} s: a collective is waiting (hang)")
