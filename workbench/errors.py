"""Exceptions the command line reports as short messages; importing this module imports no torch."""


class DeviceUnavailableError(RuntimeError):
    """An accelerator was asked for by name and this machine does not have it."""
