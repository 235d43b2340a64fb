#!/usr/bin/env bash
# Install Prometheus and promtool (Debian package "prometheus") when either is missing.
#
# Used by `make test` / CI and by `make observe`. Never starts a service (see
# scripts/apt-install.sh), and the daemon's boot-time start is disabled.
# Idempotent: does nothing when both tools exist.
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    exit 0
fi

bash "$(dirname "$0")/../scripts/apt-install.sh" install-tools.sh prometheus

# The package enables its daemon for the next boot; we only want the binaries.
# (update-rc.d disables the systemd unit too where systemctl exists.)
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi
if [ -x /etc/init.d/prometheus ] && command -v update-rc.d >/dev/null 2>&1; then
    "${SUDO[@]}" update-rc.d prometheus disable >/dev/null 2>&1 || true
fi

command -v promtool >/dev/null
command -v prometheus >/dev/null
echo "install-tools.sh: $(prometheus --version 2>&1 | head -n 1)"
