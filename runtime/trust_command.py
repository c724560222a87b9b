"""`edgepack trust add|list|remove --store DIR`: the ed25519 keys whose signed bundles the store accepts. Once it
trusts any key, install refuses unsigned bundles and signatures by other keys (runtime/signatures.py)."""

from __future__ import annotations

from pathlib import Path

import click

from . import signatures
from .cli_common import format_table, store_option


@click.group("trust")
def trust_command() -> None:
    """The keys whose signed bundles this store installs (several at once, for rotation)."""


@trust_command.command("add")
@click.argument("public_key", type=click.Path(dir_okay=False, path_type=Path))
@store_option
def add(public_key: Path, store_dir: Path) -> None:
    """Trust PUBLIC_KEY (the KEY.pub of edgepack keygen)."""
    kid = signatures.add_trusted(store_dir, public_key)
    click.echo(f"store {store_dir} trusts {kid}; unsigned bundles and other signers are now refused")


@trust_command.command("list")
@store_option
def list_keys(store_dir: Path) -> None:
    """The trusted keys."""
    keys = signatures.trusted_keys(store_dir)
    if not keys:
        click.echo(f"store {store_dir} trusts no key: bundles install unsigned (edgepack trust add KEY.pub)")
        return
    click.echo(format_table([("KEY",)] + [(kid,) for kid in sorted(keys)]))


@trust_command.command("remove")
@click.argument("key_id")
@store_option
def remove(key_id: str, store_dir: Path) -> None:
    """Stop trusting KEY_ID (as `trust list` shows it)."""
    signatures.remove_trusted(store_dir, key_id)
    left = len(signatures.trusted_keys(store_dir))
    click.echo(f"store {store_dir} no longer trusts {key_id}; {left} key(s) left"
               + ("" if left else ": bundles install unsigned again"))
