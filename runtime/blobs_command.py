"""`edgepack blobs --store DIR`: the blobs a store holds, as JSON, so `edgepack deploy` on the host sends only the
others. The device half of the deploy protocol (docs/deploy.md); an absent store holds nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from . import __version__
from .bundle_format import Digest
from .cli_common import store_option
from .errors import EdgepackError
from .store import Store


def present_blobs(store: Store) -> dict[Digest, int]:
    """Digest -> size in bytes of every blob file in the store (names that are not digests are not blobs)."""
    if not store.blobs.is_dir():
        return {}
    found = {}
    for path in store.blobs.iterdir():
        try:
            digest = Digest.parse(path.name)
        except EdgepackError:
            continue
        if path.is_file():
            found[digest] = path.stat().st_size
    return found


@click.command("blobs")
@store_option
def blobs_command(store_dir: Path) -> None:
    """Print the blobs present in the store as JSON: {"edgepack": VERSION, "blobs": {DIGEST: BYTES}}."""
    blobs = present_blobs(Store(store_dir))
    click.echo(json.dumps({"edgepack": __version__, "blobs": {str(d): n for d, n in sorted(blobs.items())}}))
