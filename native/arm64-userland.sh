#!/usr/bin/env bash
# Prepares an emulated aarch64 Debian 12 (bookworm) board on any Debian-like host: a static
# qemu-aarch64 (from the host arch's qemu-user-static .deb) and an arm64 userland with Python 3.11
# and its venv, so tests can run `qemu-aarch64-static -cpu CPU -L SYSROOT SYSROOT/usr/bin/python3.11`.
#
# Why this shape: no chroot, no binfmt_misc registration and no dpkg install, so the emulation needs
# neither root nor any change to the host. Packages are fetched with apt under a private state dir
# (own sources list, lists, cache and an empty dpkg status), the dependency closure comes from apt's
# own resolver (`apt-get -s install` against that empty status), and each .deb is unpacked with
# `dpkg-deb -x`; maintainer scripts never run (nothing here needs them). The sysroot is usr-merged
# like a real bookworm install. The versions come from the live mirror; the stamp file records them.
# Caveat of -L: an absolute path the sysroot lacks resolves on the host (/etc/pip.conf, /tmp, ...).
#
# Output: everything goes to stderr except the last lines, which are shell-sourceable:
#     eval "$(native/arm64-userland.sh)"    # sets QEMU=... and SYSROOT=... (absolute paths)
# A second run with a complete sysroot (stamp present) skips apt entirely and only re-verifies;
# delete sysroot.stamp to pick up newer package versions (the .debs already fetched stay cached).
#
# Environment: ARM64_DIR (default native/out/arm64), ARM64_MIRROR (default http://deb.debian.org/debian),
# ARM64_SECURITY_MIRROR (default http://deb.debian.org/debian-security).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${ARM64_DIR:-$ROOT/native/out/arm64}"
MIRROR="${ARM64_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${ARM64_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

# What the board needs: Python 3.11 with venv (and the pip/setuptools wheels that ensurepip uses),
# plus the C++ and OpenMP runtimes that binary wheels such as llama-cpp-python link against.
ROOTS=(python3.11 python3.11-venv libstdc++6 libgomp1)
# Left out: dpkg (python3-minimal depends on it, for maintainer scripts that never run here) with its tar,
# libacl1, libselinux1, libpcre2-8-0, libmd0; ca-certificates (python3-pip-whl's, for HTTPS to an index) with
# openssl and debconf. Installs in the emulated board are offline; qemu -L falls back to the host's
# /etc/ssl/certs for any path the sysroot lacks, should a guest pip ever need them.
EXCLUDE=(dpkg tar libacl1 libselinux1 libpcre2-8-0 libmd0 debconf openssl ca-certificates)

log() { echo "arm64-userland: $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in apt-get dpkg-deb dpkg; do
    command -v "$tool" >/dev/null || die "$tool not found: this script needs a Debian-like host with apt"
done
[[ -r "$KEYRING" ]] || die "$KEYRING missing (apt-get install debian-archive-keyring)"

DIR="$(mkdir -p "$DIR" && cd "$DIR" && pwd)"
HOST_ARCH="$(dpkg --print-architecture)"
QEMU="$DIR/qemu/usr/bin/qemu-aarch64-static"
SYSROOT="$DIR/sysroot"
STAMP="$DIR/sysroot.stamp"
STATE="$DIR/apt"
DEBS="$DIR/debs"
# The stamp's first line: a rebuild is due whenever what we asked for changes.
WANT="roots=${ROOTS[*]} exclude=${EXCLUDE[*]} mirror=$MIRROR security=$SECURITY_MIRROR host=$HOST_ARCH"

apt_private() {
    apt-get -q \
        -o APT::Architecture=arm64 -o APT::Architectures::="$HOST_ARCH" -o APT::Architectures::=arm64 \
        -o Dir::State="$STATE" -o Dir::State::Lists="$STATE/lists" -o Dir::State::Status="$STATE/status" \
        -o Dir::Cache="$STATE/cache" -o Dir::Etc::SourceList="$STATE/sources.list" \
        -o Dir::Etc::SourceParts="$STATE/empty.d" -o Dir::Etc::Preferences="$STATE/empty.d/none" \
        -o Dir::Etc::PreferencesParts="$STATE/empty.d" -o APT::Sandbox::User="$(id -un)" "$@"
}

apt_update() {
    mkdir -p "$STATE/lists/partial" "$STATE/cache/archives/partial" "$STATE/empty.d" "$DEBS"
    : >"$STATE/status"
    local arches="arm64"
    [[ "$HOST_ARCH" == arm64 ]] || arches="$HOST_ARCH,arm64"
    local suite
    {
        for suite in bookworm bookworm-updates; do
            echo "deb [arch=$arches signed-by=$KEYRING] $MIRROR $suite main"
        done
        echo "deb [arch=$arches signed-by=$KEYRING] $SECURITY_MIRROR bookworm-security main"
    } >"$STATE/sources.list"
    log "apt-get update (private state in $STATE)"
    apt_private update --error-on=any >&2 || die "apt-get update failed (no network to $MIRROR?)"
}

# "name arch version" for each package of the arm64 closure of ROOTS, minus EXCLUDE.
resolve_closure() {
    apt_private -s install --no-install-recommends "${ROOTS[@]/%/:arm64}" \
        | sed -n 's/^Inst \([^ :]*\)\(:[a-z0-9]*\)\? (\([^ ]*\) [^[]*\[\([a-z0-9]*\)\].*/\1 \4 \3/p' \
        | while read -r name arch version; do
            [[ " ${EXCLUDE[*]} " == *" $name "* ]] || echo "$name $arch $version"
        done
}

# apt-get download's file name: name_version_arch.deb with the epoch's colon URL-encoded.
deb_file() { echo "$DEBS/${1}_${3//:/%3a}_${2}.deb"; }

fetch_qemu() {
    [[ -x "$QEMU" ]] && return
    local version file
    version="$(apt_private -s install --no-install-recommends "qemu-user-static:$HOST_ARCH" \
        | sed -n 's/^Inst qemu-user-static\(:[a-z0-9]*\)\? (\([^ ]*\) .*/\2/p')" || version=""
    [[ -n "$version" ]] || die "no qemu-user-static for $HOST_ARCH in $MIRROR (Debian package qemu-user-static)"
    file="$(deb_file qemu-user-static "$HOST_ARCH" "$version")"
    [[ -f "$file" ]] || (cd "$DEBS" && apt_private download "qemu-user-static:$HOST_ARCH=$version" >&2) \
        || die "downloading qemu-user-static failed"
    rm -rf "$DIR/qemu"
    dpkg-deb -x "$file" "$DIR/qemu"
    [[ -x "$QEMU" ]] || die "$file has no usr/bin/qemu-aarch64-static"
    # The package carries every guest architecture (~370 MB); only aarch64 is wanted.
    find "$DIR/qemu/usr/bin" -name 'qemu-*' ! -name qemu-aarch64-static -delete
}

# Moves /bin, /sbin, /lib into /usr and leaves symlinks, as bookworm's usrmerge does.
usr_merge() {
    local d
    for d in bin sbin lib; do
        [[ -d "$1/$d" && ! -L "$1/$d" ]] || continue
        mkdir -p "$1/usr/$d"
        cp -a "$1/$d/." "$1/usr/$d/"
        rm -rf "${1:?}/$d"
        ln -s "usr/$d" "$1/$d"
    done
}

build_sysroot() {
    local closure name arch version file tmp="$DIR/sysroot.tmp"
    closure="$(resolve_closure)" || closure=""
    [[ -n "$closure" ]] || die "apt could not resolve ${ROOTS[*]} for arm64"
    local missing=()
    while read -r name arch version; do
        [[ -f "$(deb_file "$name" "$arch" "$version")" ]] || missing+=("$name:$arch=$version")
    done <<<"$closure"
    if ((${#missing[@]})); then
        log "downloading ${#missing[@]} arm64 packages into $DEBS"
        (cd "$DEBS" && apt_private download "${missing[@]}" >&2) || die "apt-get download failed"
    fi
    rm -rf "$tmp"
    mkdir -p "$tmp"
    while read -r name arch version; do
        dpkg-deb -x "$(deb_file "$name" "$arch" "$version")" "$tmp"
    done <<<"$closure"
    usr_merge "$tmp"
    rm -rf "$SYSROOT"
    mv "$tmp" "$SYSROOT"
    log "unpacked $(wc -l <<<"$closure") packages into $SYSROOT ($(du -sh "$SYSROOT" | cut -f1))"
    CLOSURE="$closure"
}

emulate() { "$QEMU" -cpu cortex-a76 -L "$SYSROOT" "$@"; }

verify_python() {
    local machine
    machine="$(emulate "$SYSROOT/usr/bin/python3.11" -c \
        "import platform, ssl, sqlite3, ctypes, zlib, lzma, bz2; print(platform.machine())")" \
        || die "python3.11 under qemu failed"
    [[ "$machine" == aarch64 ]] || die "python3.11 under qemu reports machine '$machine', not aarch64"
}

# A venv from the sysroot's python, and pip run straight from Debian's wheel inside it.
verify_venv() {
    local venv pip_whl
    venv="$(mktemp -d "$DIR/venv-check.XXXXXX")"
    emulate "$SYSROOT/usr/bin/python3.11" -m venv --without-pip "$venv/v" >&2 || die "python3.11 -m venv failed"
    pip_whl="$(echo "$SYSROOT"/usr/share/python-wheels/pip-*.whl)"
    emulate "$venv/v/bin/python" "$pip_whl/pip" --version >&2 || die "pip from $pip_whl failed in the venv"
    rm -rf "$venv"
}

if [[ -x "$QEMU" && -f "$STAMP" && "$(head -n1 "$STAMP")" == "$WANT" && -x "$SYSROOT/usr/bin/python3.11" ]]; then
    log "sysroot complete ($STAMP), skipping apt"
    verify_python
else
    rm -f "$STAMP"
    apt_update
    fetch_qemu
    build_sysroot
    verify_python
    verify_venv
    { echo "$WANT"; echo "qemu $("$QEMU" --version | head -n1)"; echo "$CLOSURE"; } >"$STAMP"
    log "verified: python3.11 runs as aarch64 under $("$QEMU" --version | head -n1), venv and pip work"
fi

echo "QEMU=$QEMU"
echo "SYSROOT=$SYSROOT"
