"""Every use of a private PyTorch API, in one place, with the versions it is tested on.

Tested range: torch 2.6 - 2.14 (CPU 2.13 here, CUDA 2.11 on the GPU image).  If a torch
upgrade breaks one of these, this file and ``tests/test_torch_compat.py`` are what to change.
"""

from __future__ import annotations

from typing import Any

TESTED_TORCH = (">=2.6", "<2.15")


def shutdown_loader_workers(loader: Any) -> None:
    """Stop a DataLoader's persistent worker processes now.

    Without this they are stopped by the iterator's ``__del__`` or, if a reference cycle
    keeps it alive, by multiprocessing's exit hook; under SLURM an exit hook that waits on
    workers keeps the job step alive.  Public API has no way to do it (torch issue 71187).
    """
    it = getattr(loader, "_iterator", None)
    shutdown = getattr(it, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()


def default_store() -> Any:
    """The default process group's rendezvous store (a ``PrefixStore`` over the TCPStore rank 0 hosts).

    :func:`hpcvae.dist.cleanup` keeps it past ``destroy_process_group`` to order the ranks' exit; public API
    gives the store to ``init_process_group`` but has no getter for the one ``env://`` made.
    """
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()
