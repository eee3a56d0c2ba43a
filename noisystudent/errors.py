"""The errors a user fixes (layer 0). Each names the file, key or server and what to do; the CLI
prints any :class:`UserError` as one ``error: ...`` line and exits 2, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a wrong config, an unreachable server: the message says what to do."""


class ConfigError(UserError, ValueError):
    """A config file or override is wrong; the message names the key."""


class DataError(UserError, ValueError):
    """Labeled data is missing or malformed; the message names the path and the fix."""


class ShardError(UserError, RuntimeError):
    """A shard cannot be read at all (missing, not a tar)."""


class StorageError(UserError, RuntimeError):
    """An object store or URL cannot be read or written (missing object, access denied, server
    unreachable, read-only scheme); the message names the URL."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, corrupt or cannot be loaded safely."""


class NonFiniteTrainingError(UserError, RuntimeError):
    """Training kept producing non-finite losses or gradients; the message names the epoch and step."""


class LadderError(UserError, ValueError):
    """The model ladder breaks the equal-or-larger rule."""


class OODScoreError(UserError, ValueError):
    """OOD-score selection asked for, but the analysis scores are missing or stale."""


class ClusterError(UserError, RuntimeError):
    """The Dask cluster cannot be created or reached."""


class TrackingError(UserError, RuntimeError):
    """The MLflow tracking server is unreachable or failed during the run."""


class PrepareError(UserError, ValueError):
    """Preparation cannot proceed; the message says why and what to do."""
