"""Release errors (a light module: the CLI catches them without importing pyarrow).

All are permanent failures: publishing the same thing again cannot succeed until an operator
changes the version, the endpoints, or the `allow_simulated` flag.
"""

from lgt_ops.failures import EXIT_RELEASE, PermanentFailure


class ReleaseError(PermanentFailure, RuntimeError):
    """A release cannot be published, found or compared; the message says which and why."""

    exit_code = EXIT_RELEASE


class ReleaseExists(ReleaseError):
    """The version is already published: versions are immutable."""


class SimulatedOutputRefused(ReleaseError):
    """The outputs came from the simulator and `allow_simulated` is not set."""


class ReleaseNotFound(ReleaseError):
    """No published release (or manifest) of that id."""
