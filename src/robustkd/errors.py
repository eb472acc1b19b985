"""Exceptions that carry a message a user can act on."""


class RobustKDError(Exception):
    """Base class for every error this package raises on purpose."""


class DataError(RobustKDError, ValueError):
    """Input data is missing, corrupt or inconsistent (the message names the file or mismatch)."""


class UnsafeCheckpointError(RobustKDError):
    """A checkpoint would need pickle to load and the user did not opt in."""


class ConfigError(RobustKDError, ValueError):
    """A requested setting (model, dataset, option) does not exist or does not fit."""


class TrainingError(RobustKDError):
    """Training cannot go on (a non-finite loss); the last finished epoch stays resumable."""
