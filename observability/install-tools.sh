#!/usr/bin/env bash
# Install Prometheus and promtool (Debian package "prometheus") when either is missing.
#
# Used by `make test` / CI and by `make observe`. Never starts a service: the
# package's maintainer scripts would ask invoke-rc.d to start the daemon, so a
# policy-rc.d that forbids that is put in place for the install when there is
# none (and removed afterwards), and the daemon's boot-time start is disabled.
# Idempotent: does nothing when both tools exist.
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-tools.sh: promtool/prometheus missing and apt-get not available;" \
        "install Prometheus (promtool and prometheus on PATH) by hand" >&2
    exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi

POLICY=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$POLICY" ]; then
    # 101: "action forbidden by policy", so invoke-rc.d starts nothing.
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 755 "$POLICY"
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" -eq 1 ]; then
        "${SUDO[@]}" rm -f "$POLICY"
    fi
}
trap cleanup EXIT

"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends prometheus

# The package enables its daemon for the next boot; we only want the binaries.
# (update-rc.d disables the systemd unit too where systemctl exists.)
if [ -x /etc/init.d/prometheus ] && command -v update-rc.d >/dev/null 2>&1; then
    "${SUDO[@]}" update-rc.d prometheus disable >/dev/null 2>&1 || true
fi

command -v promtool >/dev/null
command -v prometheus >/dev/null
echo "install-tools.sh: $(prometheus --version 2>&1 | head -n 1)"
