"""The runner's errors: every message is meant to be shown to the user as is."""
from ..host.locate import ComfyNotFound  # noqa: F401  (re-exported: "no ComfyUI found" is a runner error too)


class ComfyError(RuntimeError):
    """Base class of the runner's own errors."""


class ServerStartError(ComfyError):
    pass


class PortInUse(ServerStartError):
    pass


class PackImportFailed(ServerStartError):
    pass
