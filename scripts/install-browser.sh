#!/usr/bin/env bash
# Install Debian's Chromium and ChromeDriver (packages "chromium" and "chromium-driver")
# for the live page's browser tests, when either is missing.
#
# Used by `make test` / CI (through `make browser`). The tests drive
# /usr/bin/chromium through /usr/bin/chromedriver with Selenium; nothing is
# downloaded besides Debian's packages, and no service is started (see
# scripts/apt-install.sh). Idempotent: does nothing when both binaries exist.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver

if [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; then
    exit 0
fi

# Fonts for a readable page (Chromium only recommends them).
bash "$(dirname "$0")/apt-install.sh" install-browser.sh \
    chromium chromium-driver fonts-liberation fonts-dejavu-core

test -x "$CHROMIUM"
test -x "$CHROMEDRIVER"
echo "install-browser.sh: $("$CHROMEDRIVER" --version 2>&1 | head -n 1)"
