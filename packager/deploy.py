"""`edgepack deploy BUNDLE DEST`: install a bundle on a device over SSH, sending only the blobs it lacks, resumably;
`edgepack delta` writes the same delta bundle for a transport of your own (the Ansible role, docs/fleet.md).

The host asks the device which blobs its store holds (`edgepack blobs`), sends a delta bundle (the bundle's other
members, byte for byte, and only the missing blobs) to DIR/.incoming/ with the system's OpenSSH client, appending
to whatever an interrupted run left there, and has the device's own `edgepack install` verify and install it.
See docs/deploy.md.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, BinaryIO
from urllib.parse import unquote, urlsplit

import click
import msgspec

from edgepack.runtime import __version__
from edgepack.runtime.bundle_format import BUNDLE_SUFFIX, Digest, Manifest
from edgepack.runtime.errors import EdgepackError
from edgepack.runtime.memory import format_mib
from edgepack.runtime.schema import decode_json
from edgepack.runtime.store import INCOMING, bundle_manifest

from .errors import PackagerError
from .remote_runtime import DEFAULT_VENV, ensure_runtime
from .ssh import Ssh, SshTarget, last_line, reason

_BLOCK = tarfile.BLOCKSIZE
_END_OF_ARCHIVE = bytes(2 * _BLOCK)  # two zero blocks end a tar archive
_CHUNK = 1 << 20
ANSIBLE_ROLES = Path(__file__).parent / "ansible" / "roles"  # edgepack_deploy: docs/fleet.md
_DEST_FORMS = "expected ssh://[user@]host[:port]/absolute/store/path or a local store directory"


# -- the destination ---------------------------------------------------------------------------------------------

def parse_dest(text: str, port: int | None = None) -> SshTarget | Path:
    """`ssh://[user@]host[:port]/path` -> SshTarget; anything without a scheme is a local store directory."""
    if "://" not in text:
        if port is not None:
            raise PackagerError(f"deploy destination {text!r} is a local directory: --port needs an ssh:// destination")
        return Path(text)
    parts = urlsplit(text)
    where = f"deploy destination {text!r}"
    if parts.scheme != "ssh":
        raise PackagerError(f"{where}: unsupported scheme {parts.scheme + '://'!r}: {_DEST_FORMS}")
    try:
        url_port = parts.port
    except ValueError:
        raise PackagerError(f"{where}: the port is not a number from 1 to 65535: {_DEST_FORMS}") from None
    if parts.password is not None:
        raise PackagerError(f"{where}: a password in the URL is refused (deploy uses ssh keys and the ssh agent)")
    host, user, path = parts.hostname, unquote(parts.username or "") or None, unquote(parts.path)
    if not host:
        raise PackagerError(f"{where}: no host: {_DEST_FORMS}")
    if host.startswith("-") or (user or "").startswith("-"):
        raise PackagerError(f"{where}: a host or user may not start with '-'")
    if parts.query or parts.fragment:
        raise PackagerError(f"{where}: '?' and '#' have no meaning here: {_DEST_FORMS}")
    if path.rstrip("/") == "":
        raise PackagerError(f"{where}: no store path: {_DEST_FORMS}")
    if url_port is not None and port is not None and url_port != port:
        raise PackagerError(f"{where}: port {url_port} in the URL but --port {port}")
    return SshTarget(host=host, path=path.rstrip("/"), user=user, port=url_port or port)


# -- the delta bundle --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Delta:
    """A bundle without the blobs a device has: byte ranges of the original archive, then the end-of-archive
    blocks. Never copied to disk on the host: its bytes are read from the bundle as they are hashed and sent."""

    bundle: Path
    manifest: Manifest
    ranges: tuple[tuple[int, int], ...]  # (offset, length) of whole members (headers, data, padding) to keep
    sent_blobs: tuple[Digest, ...]
    skipped_blobs: tuple[Digest, ...]
    size: int
    name: str  # sha256-<hex of the content>.edgepack: the same delta resumes under the same name

    def chunks(self, start: int = 0) -> Iterator[bytes]:
        """The delta's bytes from `start` on."""
        return _delta_bytes(self.bundle, self.ranges, start)

    def write(self, path: Path) -> Path:
        """The delta as a file (to inspect it, or to carry it to a device by other means)."""
        with open(path, "wb") as out:
            for chunk in self.chunks():
                out.write(chunk)
        return path


def plan_delta(bundle: Path, present: dict[Digest, int]) -> Delta:
    """The delta of `bundle` for a device holding `present` (digest -> size): every non-blob member in order and
    each blob whose digest the device lacks at the declared size."""
    manifest = bundle_manifest(bundle)
    blob_members = {d.member_name: d for d in manifest.blobs}
    ranges: list[tuple[int, int]] = []
    sent: list[Digest] = []
    skipped: list[Digest] = []
    try:
        with tarfile.open(bundle, "r:") as archive:
            for member in archive:
                digest = blob_members.get(member.name)
                if digest is not None and present.get(digest) == manifest.blobs[digest].size:
                    skipped.append(digest)
                    continue
                if digest is not None:
                    sent.append(digest)
                end = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
                ranges.append((member.offset, end - member.offset))
    except (OSError, tarfile.TarError) as exc:
        raise PackagerError(f"{bundle}: not a readable bundle ({exc})") from None
    hasher, size = hashlib.sha256(), 0
    for chunk in _delta_bytes(bundle, ranges, 0):
        hasher.update(chunk)
        size += len(chunk)
    return Delta(bundle, manifest, tuple(ranges), tuple(sent), tuple(skipped), size,
                 f"sha256-{hasher.hexdigest()}{BUNDLE_SUFFIX}")


def _delta_bytes(bundle: Path, ranges: list[tuple[int, int]] | tuple[tuple[int, int], ...], start: int
                 ) -> Iterator[bytes]:
    position = 0
    with open(bundle, "rb") as handle:
        for offset, length in ranges:
            if position + length > start:
                skip = max(0, start - position)
                yield from _read_range(handle, offset + skip, length - skip)
            position += length
    skip = max(0, start - position)
    if skip < len(_END_OF_ARCHIVE):
        yield _END_OF_ARCHIVE[skip:]


def _read_range(handle: BinaryIO, offset: int, length: int) -> Iterator[bytes]:
    handle.seek(offset)
    while length > 0:
        chunk = handle.read(min(_CHUNK, length))
        if not chunk:
            raise PackagerError(f"{handle.name}: the bundle changed while it was being sent (it got shorter)")
        length -= len(chunk)
        yield chunk


# -- what the device holds ---------------------------------------------------------------------------------------

class _DeviceBlobs(msgspec.Struct):
    """What `edgepack blobs` prints (runtime/blobs_command.py)."""

    edgepack: str
    blobs: dict[str, Annotated[int, msgspec.Meta(ge=0)]]


# -- the protocol ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeployResult:
    delta: Delta
    bundle_size: int
    sent: int  # bytes sent by this run
    resumed_from: int  # bytes of the delta already on the device when this run began
    device_version: str
    device_report: str  # what the device's `edgepack install` printed
    seconds: float
    runtime_report: str | None = None  # with --wheels: what was done about the device's runtime


def device_blobs(ssh: Ssh, edgepack: str) -> tuple[str, dict[Digest, int]]:
    """(the device's edgepack version, digest -> size of the blobs its store holds)."""
    result = ssh.run(f"{shlex.quote(edgepack)} blobs --store {shlex.quote(ssh.target.path)}")
    where = ssh.target.destination
    if result.returncode == 127:
        raise PackagerError(f"{where}: no edgepack at {edgepack!r} on the device (pass --remote-edgepack PATH: "
                            f"the device's edgepack, e.g. /opt/edgepack/.venv/bin/edgepack)")
    if result.returncode == 2 and "No such command" in result.stderr:
        raise PackagerError(f"{where}: the device's edgepack ({edgepack}) has no `blobs` command: upgrade it to "
                            f"edgepack {__version__}")
    if result.returncode != 0:
        raise PackagerError(f"{where}: `edgepack blobs` failed: {reason(result)}")
    return parse_blobs(result.stdout, f"{where}: output of `edgepack blobs`")


def parse_blobs(text: str | bytes, where: str) -> tuple[str, dict[Digest, int]]:
    """What `edgepack blobs` printed -> (the device's edgepack version, digest -> size)."""
    listing = decode_json(text, _DeviceBlobs, where)
    try:
        return listing.edgepack, {Digest.parse(name): size for name, size in listing.blobs.items()}
    except EdgepackError as exc:
        raise PackagerError(f"{where}: {exc}") from None


def upload(ssh: Ssh, delta: Delta, remote: str, progress: bool = True) -> tuple[int, int]:
    """Append to `remote` what it lacks of the delta; (bytes already there, bytes sent)."""
    incoming = shlex.quote(str(Path(remote).parent))
    quoted = shlex.quote(remote)
    have = ssh.checked(f"mkdir -p {incoming} && if [ -f {quoted} ]; then wc -c < {quoted}; else echo 0; fi",
                       "asking the size of the partial upload")
    try:
        offset = int(have.strip())
    except ValueError:
        raise PackagerError(f"{ssh.target.destination}: unexpected answer to `wc -c`: {have.strip()!r:.80}") from None
    if offset > delta.size:  # not a prefix of this delta (the name is its content's hash): start again
        ssh.checked(f"rm -f {quoted}", "removing a stale upload")
        offset = 0
    if offset == delta.size:
        return offset, 0
    meter = _Progress(delta.size, offset, progress)
    sent = 0

    def write(stdin: BinaryIO) -> None:
        nonlocal sent
        for chunk in delta.chunks(offset):
            stdin.write(chunk)
            sent += len(chunk)
            meter.update(sent)

    failure = ssh.feed(f"cat >> {quoted}", write)
    meter.done()
    if failure is not None or offset + sent != delta.size:
        raise PackagerError(f"{ssh.target.destination}: upload interrupted after {sent:,} bytes "
                            f"({failure or 'connection closed'}): run the same command again to send the remaining "
                            f"{delta.size - offset - sent:,} bytes")
    return offset, sent


def install_args(allow_downgrade: bool = False, activate: bool = False, health_timeout: float = 120.0,
                 service: str | None = None, candidate: bool = False) -> tuple[str, ...]:
    """The device's `edgepack install` flags for these deploy options."""
    args = ["--allow-downgrade"] if allow_downgrade else []
    if candidate:
        args.append("--candidate")
    if activate:
        args += ["--activate", "--health-timeout", f"{health_timeout:g}", *(["--service", service] if service else [])]
    return tuple(args)


def remote_install(ssh: Ssh, edgepack: str, remote: str, args: tuple[str, ...] = ()) -> str:
    """The device installs the uploaded delta, verifying every blob; the upload is removed either way (a refused
    file would be refused again), and so is .incoming/ once empty, leaving a refusing store as it was."""
    store = shlex.quote(ssh.target.path)
    quoted = shlex.quote(remote)
    install = " ".join([shlex.quote(edgepack), "install", quoted, "--store", store, *map(shlex.quote, args)])
    result = ssh.run(f"{install}; code=$?; rm -f {quoted}; rmdir {shlex.quote(str(Path(remote).parent))} "
                     f"2>/dev/null; exit $code")
    if result.returncode != 0:
        raise PackagerError(f"{ssh.target.destination}: the device refused the bundle: {reason(result)}")
    return last_line(result.stdout)  # with --activate: the activation's line


def deploy_ssh(bundle: Path, target: SshTarget, *, identity: Path | None = None, ssh_options: tuple[str, ...] = (),
               remote_edgepack: str = "edgepack", install: tuple[str, ...] = (), progress: bool = True,
               wheels: Path | None = None, remote_venv: str = DEFAULT_VENV) -> DeployResult:
    started = time.monotonic()
    runtime = None
    with Ssh(target, identity, ssh_options) as ssh:
        if wheels is not None:
            runtime = ensure_runtime(ssh, wheels, remote_edgepack, remote_venv)
            remote_edgepack = runtime.edgepack
        version, present = device_blobs(ssh, remote_edgepack)
        delta = plan_delta(bundle, present)
        remote = f"{target.path}/{INCOMING}/{delta.name}"
        resumed_from, sent = upload(ssh, delta, remote, progress)
        report = remote_install(ssh, remote_edgepack, remote, install)
    return DeployResult(delta, bundle.stat().st_size, sent, resumed_from, version, report,
                        time.monotonic() - started, runtime.report if runtime else None)


class _Progress:
    """`sent X of Y MiB (P%), R MiB/s` rewritten in place on a terminal's stderr, a few times a second."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.start = total, start
        self.enabled = enabled and sys.stderr.isatty()  # a log gets the summary on stdout instead
        self.began = self.last = time.monotonic()
        self.sent = 0

    def update(self, sent: int) -> None:
        self.sent = sent
        now = time.monotonic()
        if self.enabled and now - self.last >= 0.25:
            self.last = now
            self._show(now)

    def done(self) -> None:
        if self.enabled:
            self._show(time.monotonic())
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _show(self, now: float) -> None:
        done = self.start + self.sent
        rate = self.sent / max(now - self.began, 1e-6)
        sys.stderr.write(f"\rsent {format_mib(done, 1)} of {format_mib(self.total, 1)} "
                         f"({100 * done / max(self.total, 1):.0f}%), {format_mib(int(rate), 1)}/s   ")
        sys.stderr.flush()


# -- the command -------------------------------------------------------------------------------------------------

@click.command("deploy")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dest")
@click.option("--identity", "-i", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Private key for ssh (ssh -i); default: the ssh agent and your ssh config.")
@click.option("--remote-edgepack", default="edgepack", show_default=True,
              help="The edgepack command on the device, e.g. /opt/edgepack/.venv/bin/edgepack.")
@click.option("--allow-downgrade", is_flag=True, help="Let the device install an older bundle_version.")
@click.option("--port", "-p", type=click.IntRange(1, 65535), help="SSH port (default: the URL's, else ssh's).")
@click.option("--ssh-option", "-o", "ssh_options", multiple=True, envvar="EDGEPACK_SSH_OPTIONS",
              help="An ssh -o option (KEY=VALUE), repeatable; also EDGEPACK_SSH_OPTIONS, space-separated.")
@click.option("--wheels", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A wheelhouse (edgepack wheels) installed offline on the device first when it has no edgepack or "
                   "an older one (into --remote-venv).")
@click.option("--remote-venv", default=DEFAULT_VENV, show_default=True,
              help="With --wheels: the device's venv for the runtime (relative: to the login's home).")
@click.option("--activate", is_flag=True,
              help="The device keeps the release only if it proves healthy (install --activate), else goes back.")
@click.option("--health-timeout", default=120.0, show_default=True, type=click.FloatRange(1),
              help="With --activate: seconds the release has to become healthy on the device.")
@click.option("--service", help="With --activate: the device then restarts this systemd unit on the release and "
                                "waits for its /health (install --service).")
@click.option("--candidate", is_flag=True,
              help="Install beside the device's current release as a candidate for serve's shadow/A-B trial "
                   "(install --candidate, docs/shadow.md).")
@click.option("--quiet", "-q", is_flag=True, help="No progress line.")
def deploy_command(bundle: Path, dest: str, identity: Path | None, remote_edgepack: str, allow_downgrade: bool,
                   port: int | None, ssh_options: tuple[str, ...], wheels: Path | None, remote_venv: str,
                   activate: bool, health_timeout: float, service: str | None, candidate: bool, quiet: bool) -> None:
    """Install BUNDLE on a device: DEST is ssh://[user@]host[:port]/store/dir or a local store directory.

    Only the blobs the device's store lacks are sent; an interrupted upload resumes where it stopped when the same
    command runs again. The device's edgepack verifies everything before switching releases."""
    args = install_args(allow_downgrade, activate, health_timeout, service, candidate)
    target = parse_dest(dest, port)
    if isinstance(target, Path):
        if wheels is not None:
            raise PackagerError("--wheels installs a runtime on a device over ssh: with a local store, install the "
                                "wheelhouse with pip")
        _install_locally(bundle, target, args)
        return
    result = deploy_ssh(bundle, target, identity=identity, ssh_options=ssh_options, remote_edgepack=remote_edgepack,
                        install=args, progress=not quiet, wheels=wheels, remote_venv=remote_venv)
    delta, m = result.delta, result.delta.manifest
    click.echo(f"deployed {m.name} v{m.bundle_version} to {target} (device edgepack {result.device_version})")
    if result.runtime_report:
        click.echo(f"  {result.runtime_report}")
    click.echo(f"  sent {result.sent:,} bytes of a {result.bundle_size:,}-byte bundle "
               f"({100 * result.sent / max(result.bundle_size, 1):.1f}%): {len(delta.sent_blobs)} blob(s) sent, "
               f"{len(delta.skipped_blobs)} already on the device")
    if result.resumed_from:
        click.echo(f"  resumed: {result.resumed_from:,} of the delta's {delta.size:,} bytes were already there")
    click.echo(f"  device: {result.device_report}")
    click.echo(f"  {result.seconds:.2f}s")


def _install_locally(bundle: Path, store: Path, args: tuple[str, ...]) -> None:
    """The device's own `install` command, run here."""
    from edgepack.runtime.cli import install

    install.main([str(bundle), "--store", str(store), *args], standalone_mode=False)


@click.command("delta")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--have", required=True, type=click.File("rb"),
              help="What `edgepack blobs --store DIR` printed on the device: a file, or - for stdin.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The delta bundle to write; the device installs it with `edgepack install`.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout (the Ansible role reads it).")
def delta_command(bundle: Path, have: BinaryIO, output: Path, as_json: bool) -> None:
    """Write the delta of BUNDLE for one device: every non-blob member byte for byte and only the blobs the
    device's store lacks (the bundle `edgepack deploy` would send it)."""
    if output.exists() and output.resolve() == bundle.resolve():
        raise PackagerError(f"-o {output}: that is the bundle itself; write the delta to another file")
    version, present = parse_blobs(have.read(), f"--have {have.name}")
    delta = plan_delta(bundle, present)
    delta.write(output)
    m, bundle_size = delta.manifest, bundle.stat().st_size
    if as_json:
        click.echo(json.dumps({
            "output": str(output), "file_name": delta.name, "bundle": str(bundle), "name": m.name,
            "bundle_version": m.bundle_version, "size": delta.size, "bundle_size": bundle_size,
            "blobs_sent": len(delta.sent_blobs), "blobs_skipped": len(delta.skipped_blobs),
            "device_edgepack": version}))
        return
    click.echo(f"wrote {output}: {m.name} v{m.bundle_version}, {delta.size:,} bytes of a {bundle_size:,}-byte "
               f"bundle ({100 * delta.size / max(bundle_size, 1):.1f}%): {len(delta.sent_blobs)} blob(s) carried, "
               f"{len(delta.skipped_blobs)} already on the device")


@click.command("ansible-roles")
def ansible_roles_command() -> None:
    """Print the folder of edgepack's Ansible roles, for ANSIBLE_ROLES_PATH (docs/fleet.md)."""
    click.echo(ANSIBLE_ROLES)
