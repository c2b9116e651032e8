#!/bin/sh
# Make sure `systemd-analyze` is available, for tests/test_systemd_unit.py
# (`systemd-analyze verify conf/trioserve.service`).
#
# No-op when it is already on PATH. Otherwise installs Debian's `systemd` package
# (which ships systemd-analyze) without recommends; `apt-get update` runs only if
# the first install fails, since fresh CI images often have empty package lists
# and a warm machine should not pay for an update.
# Exits 0 when systemd-analyze is usable afterwards, non-zero otherwise.
set -eu

if command -v systemd-analyze >/dev/null 2>&1; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-systemd-analyze: systemd-analyze is missing and apt-get is not available;" \
        "install systemd with your package manager" >&2
    exit 1
fi

# apt-get needs root; use sudo when we are not root and it is there.
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "ensure-systemd-analyze: not root and no sudo; cannot install systemd" >&2
        exit 1
    fi
fi

install_systemd() {
    $SUDO env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends systemd
}

if ! install_systemd; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update
    install_systemd
fi

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "ensure-systemd-analyze: systemd was installed but systemd-analyze is not on PATH" >&2
    exit 1
fi
systemd-analyze --version | head -n 1
