"""The packager's exception type: a build or inspect failure with a one-line message."""

from edgepack.runtime.errors import EdgepackError


class PackagerError(EdgepackError):
    """A host-side failure a user can fix (bad source, bad flag, quality refused)."""
