"""Exception hierarchy.

Every error a user can cause derives from :class:`HpcvaeError`, so the command-line
entry points can print it as one line instead of a traceback.  The mixed-in builtin
(``ValueError``, ``FileNotFoundError``...) keeps ``except ValueError`` working for
library users.
"""

from __future__ import annotations


class HpcvaeError(Exception):
    """Base class of every error hpcvae raises on purpose."""


class ConfigError(HpcvaeError, ValueError):
    """A config file or CLI flag holds a bad value."""


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
