#!/usr/bin/env bash
# `make observe`: a local Prometheus (Debian's `prometheus`) in the foreground,
# scraping the processes of `make run` with observability/prometheus.yml and
# evaluating observability/alerts.yml. UI and API: http://127.0.0.1:9090
# Data goes to .run/prometheus (git-ignored). Ctrl-C stops it.
# PROMETHEUS_LISTEN (default 127.0.0.1:9090) and PROMETHEUS_DATA (default
# .run/prometheus) change where; other arguments go to prometheus as they are.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v prometheus >/dev/null 2>&1; then
    echo "run_prometheus.sh: no prometheus binary; run observability/install-tools.sh" >&2
    exit 1
fi

listen="${PROMETHEUS_LISTEN:-127.0.0.1:9090}"
data="${PROMETHEUS_DATA:-.run/prometheus}"
mkdir -p "$data"
echo "Prometheus on http://$listen (targets: /targets, alerts: /alerts); start filewatch with 'make run'"
# exec: Ctrl-C and SIGTERM reach prometheus itself, which shuts down cleanly.
exec prometheus \
    --config.file=observability/prometheus.yml \
    --storage.tsdb.path="$data" \
    --storage.tsdb.retention.time=2d \
    --web.listen-address="$listen" \
    "$@"
