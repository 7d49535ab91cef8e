"""Errors of the control plane that a user can fix. The CLI prints their message as one line
(exit code 2), like ``peer.errors.SwarmError``; ``dht`` cannot import ``peer``, hence its own base."""


class ControlPlaneError(Exception):
    """A DHT problem the user can fix; the message says how."""

    exit_code = 2


class NoInitialPeersError(ControlPlaneError):
    """None of the ``--initial-peers`` answered (or an address is malformed)."""


class RunConfigMismatch(ControlPlaneError):
    """This peer's run config hashes differently from the one the run was started with."""

    def __init__(self, message: str, ours: str, theirs: str):
        super().__init__(message)
        self.ours, self.theirs = ours, theirs
