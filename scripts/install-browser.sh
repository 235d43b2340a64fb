#!/usr/bin/env bash
# Install Debian's Chromium and ChromeDriver (packages "chromium" and "chromium-driver")
# for the live page's browser tests, when either is missing.
#
# Used by `make test` / CI (through `make browser`). The tests drive
# /usr/bin/chromium through /usr/bin/chromedriver with Selenium; nothing is
# downloaded besides Debian's packages. Like observability/install-tools.sh, it
# starts no service: a policy-rc.d that forbids that is put in place for the
# install when there is none (and removed afterwards). Idempotent: does nothing
# when both binaries exist.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver

if [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser.sh: $CHROMIUM or $CHROMEDRIVER missing and apt-get not available;" \
        "install Chromium and ChromeDriver there by hand" >&2
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
# Fonts for a readable page (Chromium only recommends them).
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver fonts-liberation fonts-dejavu-core

test -x "$CHROMIUM"
test -x "$CHROMEDRIVER"
echo "install-browser.sh: $("$CHROMEDRIVER" --version 2>&1 | head -n 1)"
