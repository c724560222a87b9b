"""Pieces every command shares: the --store option and plain-text tables.

A leaf module (click only), so any command module, host or device side, can import it without cycles.
"""

from __future__ import annotations

from pathlib import Path

import click

store_option = click.option(
    "--store", "store_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="The device's store directory.",
)


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns two spaces apart; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
