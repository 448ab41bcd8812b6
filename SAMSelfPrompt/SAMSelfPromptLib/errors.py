"""Exceptions with messages meant for the user: each names what is wrong and what to do."""


class SamSelfPromptError(Exception):
    """Base class: the hosts (CLI, Slicer module, web app) show str(exc) as is."""


class InputError(SamSelfPromptError):
    """The image, volume or DICOM input cannot be segmented as given."""


class CheckpointError(SamSelfPromptError):
    """A weights or SAM-SP checkpoint file is missing, corrupt or does not fit the model."""


class DownloadError(SamSelfPromptError):
    """A model download was refused, failed or did not verify."""


class DeviceError(InputError, ValueError):
    """The requested device (cuda, cuda:1, mps, ...) does not exist on this machine."""


class OutOfMemoryError(SamSelfPromptError):
    """The device ran out of memory even at the smallest batch; the message says what to change."""


class Cancelled(SamSelfPromptError):
    """The user cancelled a running job."""
