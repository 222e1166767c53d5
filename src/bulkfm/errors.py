"""Named exceptions: every message says what is wrong and how to fix it.

All inherit from :class:`BulkfmError` and from ``ValueError`` (bad input is a bad
value), so callers can catch either.
"""

from __future__ import annotations


class BulkfmError(ValueError):
    """Base class of every error bulkfm raises on bad input or configuration."""


class BulkfmWarning(UserWarning):
    """Something looks suspicious but can be processed (e.g. counts given as TPM)."""


class InputFileError(BulkfmError):
    """A file is missing, empty, unreadable or of an unknown format."""


class ExpressionValueError(BulkfmError):
    """Expression values are non-numeric, NaN/inf or negative."""


class DuplicateIdError(BulkfmError):
    """Duplicate sample ids or duplicate genes where the rule says reject."""


class OrientationError(BulkfmError):
    """A matrix looks transposed (genes where samples should be, or the reverse)."""


class GeneMappingError(BulkfmError):
    """Gene ids cannot be mapped, or too few of a vocabulary's genes are present."""


class UnitError(BulkfmError):
    """Values look wrong for the unit asked for (e.g. logged values given as counts)."""


class ClinicalMatchError(BulkfmError):
    """Sample ids match no clinical row, or a clinical table is malformed."""


class SplitError(BulkfmError):
    """A split cannot be made (e.g. a class has fewer samples than splits)."""


class ConfigError(BulkfmError):
    """A configuration value is invalid."""


class DownloadError(BulkfmError):
    """A download or a remote query failed: not found, access denied, a corrupted file
    (md5 mismatch), or a server that kept failing after the retries. ``status`` is the
    last HTTP status code (``None`` when no response came)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class CheckpointError(BulkfmError):
    """A checkpoint does not match its config, gene list or the model."""


class LockTimeoutError(BulkfmError):
    """Waited longer than allowed for a lock that another (live) process holds, e.g. on a
    bench cache entry that it is computing."""


class OutputPathError(ConfigError):
    """An output path cannot be written: a folder where a file is expected (or the
    reverse), a place under a regular file or without write access, or a file suffix the
    command cannot write. Raised before any work starts."""
