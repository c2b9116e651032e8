#!/bin/sh
# Usage: scripts/ensure-command.sh COMMAND DEBIAN_PACKAGE
#
# Make sure COMMAND is on PATH, for the tests that need a real one (chromium for the status
# page, haproxy for scale-out, systemd-analyze for the unit file). No-op when it is there.
# Otherwise installs the Debian package without recommends; `apt-get update` runs only if the
# first install fails, since fresh CI images often have empty package lists and a warm machine
# should not pay for an update. Exits 0 when COMMAND is usable afterwards, non-zero otherwise.
set -eu

if [ "$#" -ne 2 ]; then
    echo "usage: $0 COMMAND DEBIAN_PACKAGE" >&2
    exit 2
fi
COMMAND=$1
PACKAGE=$2

if command -v "$COMMAND" >/dev/null 2>&1; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-command: $COMMAND is missing and apt-get is not available;" \
        "install $PACKAGE with your package manager" >&2
    exit 1
fi

# apt-get needs root; use sudo when we are not root and it is there.
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "ensure-command: not root and no sudo; cannot install $PACKAGE" >&2
        exit 1
    fi
fi

install_package() {
    $SUDO env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "$PACKAGE"
}

if ! install_package; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update
    install_package
fi

if ! command -v "$COMMAND" >/dev/null 2>&1; then
    echo "ensure-command: $PACKAGE was installed but $COMMAND is not on PATH" >&2
    exit 1
fi
echo "ensure-command: $COMMAND is $(command -v "$COMMAND")"
