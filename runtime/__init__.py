"""edgepack's device side: bundle format reader, store, hardware probe, engine, server.

Never imports edgepack.packager: this package installs on a board without host-only tools.
"""

__version__ = "0.1.0"
