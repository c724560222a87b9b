"""edgepack flash on synthetic disk images with Raspberry Pi OS's partition roles (MBR: FAT32 bootfs, then the ext4
rootfs) and the Jetson SD image's (GPT, the ext4 root named APP), made by sfdisk, mkfs.vfat and mkfs.ext4 into files.

What the image holds is read back with the tools themselves (debugfs, mcopy, sfdisk, e2fsck), not with flash's own
reader; the first-boot script runs for real against a copy of the image's tree (EDGEPACK_ROOT): it installs the
runtime offline from the wheelhouse, and the store it leaves is served.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import build_bundle, corrupt_new_blob, post_json, run_cli, serving
from disk_images import BOOT_START, MiB, make_jetson_image, make_pi_image, run_tool, tool

from edgepack.packager.disk_image import missing_tools

pytestmark = pytest.mark.skipif(bool(missing_tools()), reason="edgepack flash needs " + ", ".join(missing_tools())
                                + ": apt-get install mtools dosfstools fdisk e2fsprogs")

def debugfs(image: Path, offset: int, command: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("debugfs"), "-R", command, f"{image}?offset={offset}"], capture_output=True,
                          timeout=60)


def image_file(image: Path, offset: int, path: str) -> bytes:
    done = debugfs(image, offset, f"cat {path}")
    assert b"not found" not in done.stderr, f"{path}: {done.stderr}"
    return done.stdout


def partitions(image: Path) -> list[dict]:
    """sfdisk's rows without the file name (`node`)."""
    rows = json.loads(run_tool("sfdisk", "--json", str(image)))["partitiontable"]["partitions"]
    return [{key: value for key, value in row.items() if key != "node"} for row in rows]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory) -> Path:
    key = tmp_path_factory.mktemp("key") / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key.with_suffix(".pub")


def flash(*args: object) -> subprocess.CompletedProcess:
    return run_cli("flash", *map(str, args), timeout=600)


@pytest.fixture(scope="module")
def flashed(tiny_bundle, host_wheelhouse, ssh_key, tmp_path_factory) -> dict:
    """One Raspberry Pi OS-shaped image with too little room in its root, flashed with everything."""
    work = tmp_path_factory.mktemp("flash")
    stock = work / "stock.img"
    offset = make_pi_image(stock, root_mib=64)
    stock_digest = sha256(stock)
    keys = work / "api-keys"
    keys.write_text("# the board's clients\nsk-board-7f3a\n")
    done = flash("--board", "rpi5", "--image", stock, "--bundle", tiny_bundle, "--wheels", host_wheelhouse,
                 "-o", work / "out.img", "--ssh-key", ssh_key, "--hostname", "agent-7", "--host", "0.0.0.0",
                 "--api-key-file", keys)
    assert done.returncode == 0, done.stderr
    return {"stock": stock, "stock_digest": stock_digest, "out": work / "out.img", "offset": offset,
            "stdout": done.stdout, "work": work}


def test_the_flashed_image_holds_the_store_the_wheelhouse_and_the_units(flashed, tiny_bundle, host_wheelhouse):
    out, offset = flashed["out"], flashed["offset"]
    assert sha256(flashed["stock"]) == flashed["stock_digest"], "the stock image was changed"
    run_tool("e2fsck", "-fn", f"{out}?offset={offset}")
    # the root was too small: the partition and its file system grew, the boot partition did not move
    before, after = partitions(flashed["stock"]), partitions(out)
    assert after[0] == before[0] and after[1]["start"] == before[1]["start"] and after[1]["size"] > before[1]["size"]
    assert after[1]["start"] + after[1]["size"] == out.stat().st_size // 512
    assert "grown by" in flashed["stdout"] and "read back and verified" in flashed["stdout"]

    readback = flashed["work"] / "readback"
    for tree in ("/var/lib/edgepack", "/opt/edgepack"):
        (readback / tree.split("/")[1]).mkdir(parents=True)
        assert debugfs(out, offset, f"rdump {tree} {readback / tree.split('/')[1]}").returncode == 0
    checks = {c["name"]: c for c in json.loads(run_cli("doctor", "--store", str(readback / "var/edgepack/store"),
                                                       "--json").stdout)["checks"]}
    assert checks["store"]["status"] == checks["blobs"]["status"] == "ok", checks["store"]
    assert "tiny" in checks["store"]["summary"] and "all intact" in checks["blobs"]["summary"]
    for wheel in host_wheelhouse.glob("*.whl"):
        assert sha256(readback / "opt/edgepack/wheelhouse" / wheel.name) == sha256(wheel)

    unit = image_file(out, offset, "/etc/systemd/system/edgepack.service").decode()
    assert "ExecStart=/opt/edgepack/venv/bin/edgepack serve --store /var/lib/edgepack/store --host 0.0.0.0" in unit
    assert "User=edgepack" in unit and "LoadCredential=edgepack-api-keys:/etc/edgepack/api-keys" in unit
    assert image_file(out, offset, "/etc/edgepack/api-keys") == b"# the board's clients\nsk-board-7f3a\n"
    assert b"Mode:  0600" in debugfs(out, offset, "stat /etc/edgepack/api-keys").stdout
    link = debugfs(out, offset, "stat /etc/systemd/system/multi-user.target.wants/edgepack-firstboot.service")
    assert b'Fast link dest: "/etc/systemd/system/edgepack-firstboot.service"' in link.stdout
    assert image_file(out, offset, "/etc/hostname") == b"agent-7\n"
    hosts = image_file(out, offset, "/etc/hosts").decode()
    assert "127.0.1.1\tagent-7" in hosts and "raspberrypi" not in hosts and "::1\t\tlocalhost" in hosts
    boot = subprocess.run([tool("mcopy"), "-n", "-i", f"{out}@@{BOOT_START * 512}", "::/ssh", "-"],
                          capture_output=True, timeout=60)
    assert boot.returncode == 0 and boot.stdout == b"", "Raspberry Pi OS enables sshd when bootfs has 'ssh'"
    record = json.loads(image_file(out, offset, "/opt/edgepack/flash.json"))
    assert record["board"] == "rpi5" and record["bundle"] == tiny_bundle.name


def test_first_boot_installs_the_runtime_offline_and_the_store_serves(flashed, ssh_key, monkeypatch):
    """firstboot.sh for real, against the image's tree: venv + offline pip install, users, ownership, units."""
    tree = flashed["work"] / "tree"
    tree.mkdir()
    for top in ("/etc", "/var", "/opt", "/home"):
        assert debugfs(flashed["out"], flashed["offset"], f"rdump {top} {tree}").returncode == 0
    env = {**os.environ, "EDGEPACK_ROOT": str(tree), "PIP_NO_CACHE_DIR": "1"}
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run(["sh", str(tree / "opt/edgepack/firstboot.sh")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr + done.stdout
    users = {line.split(":")[0]: line.split(":") for line in (tree / "etc/passwd").read_text().splitlines()}
    assert users["edgepack"][6] == "/usr/sbin/nologin"
    assert (tree / "var/lib/edgepack/store").stat().st_uid == int(users["edgepack"][2])
    keys = tree / "home/admin/.ssh/authorized_keys"
    assert keys.read_text().strip() == ssh_key.read_text().strip() and (keys.stat().st_mode & 0o777) == 0o600
    assert (tree / "opt/edgepack/firstboot.done").exists()
    if shutil.which("systemctl"):
        enabled = subprocess.run(["systemctl", f"--root={tree}", "is-enabled", "edgepack.service"],
                                 capture_output=True, text=True)
        assert enabled.stdout.strip() == "enabled"
        firstboot = subprocess.run(["systemctl", f"--root={tree}", "is-enabled", "edgepack-firstboot.service"],
                                   capture_output=True, text=True)
        assert firstboot.stdout.strip() == "disabled"
    # as systemd would start it: the key file handed over as the credential (LoadCredential=)
    credentials = flashed["work"] / "credentials"
    credentials.mkdir()
    shutil.copy(tree / "etc/edgepack/api-keys", credentials / "edgepack-api-keys")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    python = tree / "opt/edgepack/venv/bin/python"
    with serving(tree / "var/lib/edgepack/store", "--threads", "2", python=python) as base:
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                "temperature": 0}
        assert post_json(f"{base}/v1/chat/completions", chat)[0] == 401
        request = urllib.request.Request(f"{base}/v1/chat/completions", json.dumps(chat).encode(),
                                         {"Content-Type": "application/json",
                                          "Authorization": "Bearer sk-board-7f3a"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200 and json.loads(response.read())["choices"][0]["message"]


def test_an_image_with_room_is_not_grown_and_xz_and_zip_images_are_read(tiny_bundle, host_wheelhouse, tmp_path):
    stock = tmp_path / "roomy.img"
    offset = make_pi_image(stock, root_mib=400)
    with lzma.open(tmp_path / "roomy.img.xz", "wb", preset=0) as packed:
        packed.write(stock.read_bytes())
    done = flash("--board", "rpi4", "--image", tmp_path / "roomy.img.xz", "--bundle", tiny_bundle, "--wheels",
                 host_wheelhouse, "-o", tmp_path / "out.img")
    assert done.returncode == 0, done.stderr
    assert "grown" not in done.stdout and partitions(tmp_path / "out.img") == partitions(stock)
    assert (tmp_path / "out.img").stat().st_size == stock.stat().st_size
    assert debugfs(tmp_path / "out.img", offset, "stat /etc/hostname").returncode == 0
    assert image_file(tmp_path / "out.img", offset, "/etc/hostname") == b"raspberrypi\n", "no --hostname: untouched"
    assert b"not found" in debugfs(tmp_path / "out.img", offset, "stat /opt/edgepack/authorized_keys").stderr

    with zipfile.ZipFile(tmp_path / "sd-blob.zip", "w") as archive:
        archive.write(stock, "sd-blob.img")
    done = flash("--board", "rpi4", "--image", tmp_path / "sd-blob.zip", "--bundle", tiny_bundle, "--wheels",
                 host_wheelhouse, "-o", tmp_path / "from-zip.img")
    assert done.returncode == 0, done.stderr


def test_a_jetson_shaped_gpt_image_grows_its_app_partition(tiny_bundle, host_wheelhouse, tmp_path):
    stock = tmp_path / "jetson.img"
    offset = make_jetson_image(stock, root_mib=48)
    done = flash("--board", "jetson-orin-nano", "--image", stock, "--bundle", tiny_bundle, "--wheels",
                 host_wheelhouse, "-o", tmp_path / "out.img")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out.img"
    run_tool("sfdisk", "--verify", str(out))  # the backup GPT moved to the new end
    after = partitions(out)
    assert [p["name"] for p in after] == ["mb1", "cpu-bootloader", "esp", "APP"]
    assert after[:3] == partitions(stock)[:3] and after[3]["size"] > partitions(stock)[3]["size"]
    run_tool("e2fsck", "-fn", f"{out}?offset={offset}")
    assert "--board jetson-orin-nano" in image_file(out, offset, "/etc/systemd/system/edgepack.service").decode()


def _refused(done: subprocess.CompletedProcess, *words: str) -> None:
    """Refused with one line (after any progress lines) that names what was wrong."""
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and errors[0] == done.stderr.strip().splitlines()[-1], done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in errors[0], errors[0]


def test_bad_inputs_are_refused_in_one_line_and_nothing_is_written(flashed, tiny_bundle, host_wheelhouse, ssh_key,
                                                                  tmp_path):
    stock = flashed["stock"]
    out = tmp_path / "out.img"
    base = ["--board", "rpi5", "--bundle", tiny_bundle, "--wheels", host_wheelhouse, "-o", out]

    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(3 * MiB))
    _refused(flash("--image", junk, *base), "junk.img")
    _refused(flash("--image", flashed["out"], *base), "already exists", "stock image")
    damaged = tmp_path / "damaged.img.xz"
    damaged.write_bytes(lzma.compress(stock.read_bytes()[:4 * MiB], preset=0)[:-64])
    _refused(flash("--image", damaged, *base), "damaged archive")

    broken = tmp_path / "broken.edgepack"
    corrupt_new_blob(None, tiny_bundle, broken)
    _refused(flash("--image", stock, "--board", "rpi5", "--bundle", broken, "--wheels", host_wheelhouse, "-o", out),
             "sha256")

    no_pip = tmp_path / "no-pip"
    no_pip.mkdir()
    for wheel in host_wheelhouse.glob("*.whl"):
        if not wheel.name.startswith("pip-"):
            shutil.copy(wheel, no_pip / wheel.name)
    _refused(flash("--image", stock, "--board", "rpi5", "--bundle", tiny_bundle, "--wheels", no_pip, "-o", out),
             "no pip wheel")
    (no_pip / "edgepack-wheels.json").write_text(json.dumps({"board": "rpi4"}))
    shutil.copy(next(host_wheelhouse.glob("pip-*.whl")), no_pip)
    _refused(flash("--image", stock, "--board", "rpi5", "--bundle", tiny_bundle, "--wheels", no_pip, "-o", out),
             "built for rpi4")
    _refused(flash("--image", stock, *base, "--hostname", "Bad_Name"), "--hostname")
    (tmp_path / "no-keys").write_text("# nobody yet\n")
    _refused(flash("--image", stock, *base, "--api-key-file", tmp_path / "no-keys"), "--api-key-file")
    _refused(flash("--image", stock, *base, "--ssh-key", ssh_key.with_suffix("")), "not an OpenSSH public key")
    _refused(flash("--image", stock, *base, "--device", tmp_path / "x"), "one of")

    assert not out.exists() and not list(tmp_path.glob(".edgepack-flash-*"))
    assert sha256(stock) == flashed["stock_digest"]


def _root_disk() -> Path | None:
    source = subprocess.run(["findmnt", "-no", "SOURCE", "/"], capture_output=True, text=True).stdout.strip()
    return Path(source) if source.startswith("/dev/") and Path(source).is_block_device() else None


def test_a_device_must_be_an_unused_block_device_and_needs_yes(flashed, tiny_bundle, host_wheelhouse):
    base = ["--board", "rpi5", "--image", flashed["stock"], "--bundle", tiny_bundle, "--wheels", host_wheelhouse]
    _refused(flash(*base, "--device", flashed["out"], "--yes"), "not a block device")
    root = _root_disk()
    if root is not None:
        _refused(flash(*base, "--device", root, "--yes"), "root file system")


@pytest.fixture()
def loop_device(tmp_path):
    backing = tmp_path / "card.img"
    with open(backing, "wb") as f:
        f.truncate(1024 * MiB)
    done = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"no loop device here (losetup: {done.stderr.strip()}): needs root and /dev/loop-control")
    device = Path(done.stdout.strip())
    try:
        yield device, backing
    finally:
        subprocess.run(["losetup", "-d", str(device)], check=False)


def test_writing_a_card_asks_for_yes_then_writes_and_reads_it_back(flashed, tiny_bundle, host_wheelhouse,
                                                                  loop_device):
    device, backing = loop_device
    base = ["--board", "rpi5", "--image", flashed["stock"], "--bundle", tiny_bundle, "--wheels", host_wheelhouse,
            "--device", device]
    _refused(flash(*base), "--yes")
    assert backing.read_bytes()[:512] == bytes(512), "nothing written without --yes"
    done = flash(*base, "--yes")
    assert done.returncode == 0, done.stderr
    assert f"written to {device} and read back" in done.stdout
    size = flashed["out"].stat().st_size
    with open(device, "rb") as card:
        written = card.read(size)
    assert partitions(backing)[1]["start"] == partitions(flashed["stock"])[1]["start"]
    offset = flashed["offset"]
    copy = backing.parent / "copy.img"
    copy.write_bytes(written)
    run_tool("e2fsck", "-fn", f"{copy}?offset={offset}")
    assert image_file(copy, offset, "/opt/edgepack/flash.json")


def test_a_mounted_device_is_refused(flashed, tiny_bundle, host_wheelhouse, loop_device, tmp_path):
    device, backing = loop_device
    run_tool("mkfs.ext4", "-q", str(device))
    (tmp_path / "mnt").mkdir()
    mounted = subprocess.run(["mount", str(device), str(tmp_path / "mnt")], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount here: {mounted.stderr.strip()}")
    try:
        _refused(flash("--board", "rpi5", "--image", flashed["stock"], "--bundle", tiny_bundle, "--wheels",
                       host_wheelhouse, "--device", device, "--yes"), "mounted at", str(tmp_path / "mnt"))
    finally:
        subprocess.run(["umount", str(tmp_path / "mnt")], check=False)
    assert backing.read_bytes()[:512] == bytes(512), "no partition table was written (ext4 leaves this zero)"


def test_trust_makes_the_boards_store_demand_signed_bundles(tiny_gguf, tiny_bundle, host_wheelhouse, tmp_path):
    assert run_cli("keygen", "-o", str(tmp_path / "signer")).returncode == 0
    signed = build_bundle(tiny_gguf, tmp_path / "signed.edgepack", quant="Q8_0", name="tiny",
                          sign=tmp_path / "signer")
    stock = tmp_path / "stock.img"
    offset = make_pi_image(stock, root_mib=400)
    base = ["--board", "rpi5", "--image", stock, "--wheels", host_wheelhouse, "--trust", tmp_path / "signer.pub"]
    _refused(flash(*base, "--bundle", tiny_bundle, "-o", tmp_path / "unsigned.img"), "unsigned bundle refused")
    assert not (tmp_path / "unsigned.img").exists()
    done = flash(*base, "--bundle", signed, "-o", tmp_path / "out.img")
    assert done.returncode == 0, done.stderr
    listing = debugfs(tmp_path / "out.img", offset, "ls -p /var/lib/edgepack/store/trust").stdout.decode()
    trusted = re.findall(r"/([^/]+\.pub)/", listing)
    assert len(trusted) == 1 and trusted[0].startswith("ed25519-"), listing
    pub = image_file(tmp_path / "out.img", offset, f"/var/lib/edgepack/store/trust/{trusted[0]}")
    assert pub == (tmp_path / "signer.pub").read_bytes()
