"""Release errors (a light module: the CLI catches them without importing pyarrow)."""


class ReleaseError(RuntimeError):
    """A release cannot be published, found or compared; the message says which and why."""


class ReleaseExists(ReleaseError):
    """The version is already published: versions are immutable."""
