#!/bin/sh
# edgepack first boot, written into the image by `edgepack flash` (docs/boards.md, "Flashing an SD card").
# Once, at the board's first boot: install the runtime offline from the wheelhouse, create the service user, give
# it the store, install the SSH key if one was flashed, then enable and start edgepack.service and disable itself.
# EDGEPACK_ROOT runs it against a copy of the image's tree (tests): paths and systemctl/useradd then act on that
# tree, and nothing is started.
set -eu
ROOT="${EDGEPACK_ROOT:-}"
HOME_DIR=/opt/edgepack
E="$ROOT$HOME_DIR"
STORE="$ROOT/var/lib/edgepack"
SERVICE_USER=edgepack
log() { echo "edgepack-firstboot: $*"; }

if [ -n "$ROOT" ]; then
    systemctl() { command systemctl --root="$ROOT" "$@"; }
    useradd() { command useradd --prefix "$ROOT" "$@"; }
fi
uid_of() { awk -F: -v u="$1" '$1 == u { print $3 }' "$ROOT/etc/passwd"; }
gid_of() { awk -F: -v u="$1" '$1 == u { print $4 }' "$ROOT/etc/passwd"; }

log "installing the runtime from $HOME_DIR/wheelhouse (offline)"
rm -rf "$E/venv"
python3 -m venv --without-pip "$E/venv"
pip_wheel=$(ls "$E"/wheelhouse/pip-*.whl | head -n 1)
"$E/venv/bin/python" "$pip_wheel/pip" install --quiet --no-index --find-links "$E/wheelhouse" \
    --disable-pip-version-check --no-warn-script-location edgepack
"$E/venv/bin/edgepack" --version

if [ -z "$(uid_of "$SERVICE_USER")" ]; then
    log "creating the system user $SERVICE_USER"
    useradd --system --user-group --home-dir /var/lib/edgepack --shell /usr/sbin/nologin "$SERVICE_USER"
fi
chown -R "$(uid_of "$SERVICE_USER"):$(gid_of "$SERVICE_USER")" "$STORE"

if [ -f "$E/authorized_keys" ]; then
    ssh_user=$(cat "$E/ssh-user")
    if [ -z "$(uid_of "$ssh_user")" ]; then
        log "creating the login user $ssh_user (key-only: no password)"
        useradd --create-home --user-group --shell /bin/bash "$ssh_user"
    fi
    home=$(awk -F: -v u="$ssh_user" '$1 == u { print $6 }' "$ROOT/etc/passwd")
    install -d -m 700 "$ROOT$home/.ssh"
    cat "$E/authorized_keys" >> "$ROOT$home/.ssh/authorized_keys"
    chmod 600 "$ROOT$home/.ssh/authorized_keys"
    chown -R "$(uid_of "$ssh_user"):$(gid_of "$ssh_user")" "$ROOT$home/.ssh"
    systemctl enable ssh.service 2>/dev/null || systemctl enable sshd.service 2>/dev/null || \
        log "no ssh service to enable"
fi

systemctl enable edgepack.service
systemctl disable edgepack-firstboot.service
touch "$E/firstboot.done"
log "done: edgepack.service enabled"
if [ -z "$ROOT" ]; then
    systemctl start --no-block edgepack.service
fi
