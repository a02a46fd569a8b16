"""Method state across ranks without Lightning: ``gloo_ranks(worker, out_dir)`` runs
``worker(rank, world, port, out_dir)`` in ``world`` processes joined by a gloo process group
on 127.0.0.1 (the worker calls ``init_process_group`` with the port it is given).

The processes are forked, not spawned: they inherit this process's imports (torch, kdlab)
instead of importing them again, which is most of a spawned process's start-up. Each worker
sets ``torch.set_num_threads(1)`` before any tensor work, so no OpenMP pool crosses the fork.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_ranks(worker: Callable[[int, int, int, str], None], out_dir: Path,
               world: int = 2) -> None:
    """Run ``worker`` on ``world`` forked ranks; raises if any rank fails."""
    import torch.multiprocessing as mp

    mp.start_processes(worker, args=(world, free_port(), str(out_dir)), nprocs=world,
                       join=True, start_method="fork")
