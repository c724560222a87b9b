"""The `edgepack flash` command: options, the wheelhouse when none is given, and the block-device guard."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from edgepack.runtime.boards import load_board
from edgepack.runtime.memory import format_mib

from . import wheels
from .errors import PackagerError
from .flash import FlashOptions, check_device, copy_to_device, flash_image

_file = click.Path(dir_okay=False, path_type=Path)


@click.command(name="flash")
@click.option("--board", required=True, help="The board the image is for: rpi4, rpi5 or jetson-orin-nano.")
@click.option("--image", required=True, type=_file,
              help="The stock OS image: .img, .img.xz (Raspberry Pi OS) or a .zip holding one .img (Jetson).")
@click.option("--bundle", required=True, type=_file, help="The bundle to install into the image's store.")
@click.option("--wheels", "wheels_dir", type=click.Path(file_okay=False, path_type=Path),
              help="The board's wheelhouse (`edgepack wheels`); default: built now (cached).")
@click.option("-o", "--output", type=_file, help="Write the flashed image to this file.")
@click.option("--device", type=click.Path(path_type=Path), help="Write it to this block device (an SD card reader).")
@click.option("--yes", is_flag=True, help="With --device: write without asking (everything on the device is lost).")
@click.option("--ssh-key", type=_file, help="An OpenSSH public key file: first boot adds it to --ssh-user.")
@click.option("--ssh-user", default="admin", show_default=True, help="The login that gets --ssh-key.")
@click.option("--hostname", help="The board's host name (/etc/hostname, /etc/hosts).")
@click.option("--trust", type=_file, help="A public key the store trusts (`edgepack keygen`): updates must be signed.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the service listens on (0.0.0.0 for the LAN).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--api-key-file", type=_file,
              help="API keys, one a line: the service then requires 'Authorization: Bearer KEY' "
                   "(serve --api-key-file).")
def flash_command(board: str, image: Path, bundle: Path, wheels_dir: Path | None, output: Path | None,
                  device: Path | None, yes: bool, ssh_key: Path | None, ssh_user: str, hostname: str | None,
                  trust: Path | None, host: str, port: int, api_key_file: Path | None) -> None:
    """Make a stock OS image boot into a serving agent: the bundle installed in a store, the runtime's wheelhouse,
    edgepack.service and a first-boot step that installs the runtime offline and enables the service. Written
    without root or mounting, then read back and compared (docs/boards.md)."""
    if (output is None) == (device is None):
        raise PackagerError("give one of -o/--output FILE or --device /dev/sdX")
    if device is not None:
        check_device(device)
        if not yes:
            raise PackagerError(f"--device {device}: everything on it will be lost: add --yes to write it")
    profile = load_board(board)
    with tempfile.TemporaryDirectory(prefix="edgepack-flash-") as scratch:
        if wheels_dir is None:
            wheels_dir = Path(scratch) / "wheels"
            click.echo(f"building the {profile.name} wheelhouse (cached after the first time)", err=True)
            wheels.build_wheelhouse(profile.name, wheels_dir, log=sys.stderr)
        options = FlashOptions(profile, image, bundle, wheels_dir, ssh_key, ssh_user, hostname, trust, host, port,
                               api_key_file)
        target = output if output is not None else Path(scratch) / "flashed.img"
        result = flash_image(options, target, log=lambda line: click.echo(line, err=True))
        click.echo(f"image: {target if output else device} ({format_mib(result.image_bytes)}), release "
                   f"{result.release}, {result.files} files ({format_mib(result.bytes_written)}) in partition "
                   f"{result.root.number}" + (f", grown by {format_mib(result.grown_by)}" if result.grown_by else "")
                   + f", read back and verified in {result.seconds:.1f} s")
        if device is not None:
            check_device(device, result.image_bytes)
            seconds = copy_to_device(target, device)
            click.echo(f"written to {device} and read back in {seconds:.1f} s")
    click.echo("first boot installs the runtime and starts edgepack.service; `edgepack doctor` on the board checks it")
