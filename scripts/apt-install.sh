#!/usr/bin/env bash
# Install Debian packages with apt-get, starting no service: apt-install.sh WHO PACKAGE...
#
# WHO names the caller in messages. The packages' maintainer scripts would ask
# invoke-rc.d to start their daemons, so a policy-rc.d that forbids that is put
# in place for the install when there is none (and removed afterwards). Uses
# sudo when not root. Used by observability/install-tools.sh and
# scripts/install-browser.sh, which first check whether anything is missing.
set -euo pipefail

who=$1
shift

if ! command -v apt-get >/dev/null 2>&1; then
    echo "$who: apt-get not available; install $* by hand" >&2
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
    apt-get install -y -qq --no-install-recommends "$@"
