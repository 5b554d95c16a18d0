"""Exception hierarchy.

Every error a user can cause derives from :class:`HpcvaeError`, so the command-line
entry points can print it as one line instead of a traceback.  The mixed-in builtin
(``ValueError``, ``FileNotFoundError``...) keeps ``except ValueError`` working for
library users.
"""

from __future__ import annotations


class HpcvaeError(Exception):
    """Base class of every error hpcvae raises on purpose.

    ``collective=True`` marks an error every rank of a run raises identically (a config or
    data problem all ranks see): the command line then prints it on rank 0 only.
    """

    def __init__(self, *args: object, collective: bool = False) -> None:
        super().__init__(*args)
        self.collective = collective


class ConfigError(HpcvaeError, ValueError):
    """A config file or CLI flag holds a bad value; ``key`` is its dotted name where known."""

    def __init__(self, *args: object, key: str | None = None, collective: bool = False) -> None:
        super().__init__(*args, collective=collective)
        self.key = key


class CatalogError(HpcvaeError, ValueError):
    """A RealGalaxyCatalog table is missing columns or has inconsistent rows."""


class FitsReadError(HpcvaeError, OSError):
    """A FITS image file or HDU cannot be read or holds unusable pixels."""


class ShardError(HpcvaeError, ValueError):
    """A shard set (tar shards + manifest) is missing, corrupt or inconsistent."""


class ModelError(HpcvaeError, ValueError):
    """A model was asked for something its architecture cannot do."""


class CheckpointError(HpcvaeError, RuntimeError):
    """A checkpoint or consolidated model is missing, incomplete or mismatched."""


class LaunchError(HpcvaeError, RuntimeError):
    """A SLURM / submitit job cannot be built, submitted or followed."""


class DistributedError(HpcvaeError, RuntimeError):
    """The distributed environment is inconsistent (ranks, world size, backend)."""


class RunFolderBusy(HpcvaeError, RuntimeError):
    """Another process holds the run folder's lock (two runs with the same ``--out``)."""


class NumericalError(HpcvaeError, FloatingPointError):
    """Training produced a non-finite loss, gradient or weight; the last good checkpoint is kept."""
