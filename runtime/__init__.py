"""edgepack's device side: bundle format reader, store, hardware probe, engine, server.

Never imports edgepack.packager: this package installs on a board without host-only tools.
"""

from importlib.metadata import version

__version__ = version("edgepack")  # one place: pyproject.toml
