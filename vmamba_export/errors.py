"""Error types with messages a user can act on. The CLI prints them in one line; `--debug` shows the trace."""

from __future__ import annotations


class VMambaExportError(Exception):
    """Base of every error this package raises on purpose."""


class UnknownModelError(VMambaExportError):
    pass


class CheckpointError(VMambaExportError):
    """A checkpoint file cannot be read, or holds something other than the expected weights."""


class ConfigDetectionError(CheckpointError):
    pass


class StateDictMismatchError(CheckpointError):
    pass


class ImageSourceError(VMambaExportError):
    pass


class InputError(VMambaExportError):
    """An input array or image does not fit the model (rank, channels, dtype, size)."""


class ArtifactError(VMambaExportError):
    """An artifact folder is missing files, has been modified, or was built for something else."""


class TargetUnavailableError(VMambaExportError):
    """The runtime or toolchain a target needs is not installed or not built here."""


class ParityError(VMambaExportError):
    pass
