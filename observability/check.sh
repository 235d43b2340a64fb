#!/usr/bin/env bash
# Checks observability/ with Prometheus' own promtool (run by `make test`):
# the Prometheus config, the alert rules and their unit tests; and that the
# Grafana dashboard is valid JSON with PromQL targets. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1; then
    echo "check.sh: no promtool; run observability/install-tools.sh" >&2
    exit 1
fi

promtool check config observability/prometheus.yml
promtool check rules observability/alerts.yml
promtool test rules observability/alerts_test.yml

python3 - observability/grafana-dashboard.json <<'PY'
"""The dashboard parses as JSON and every panel has at least one PromQL target."""
import json
import sys

path = sys.argv[1]
with open(path, encoding="utf-8") as f:
    dashboard = json.load(f)
panels = [p for p in dashboard.get("panels", []) if p.get("type") != "row"]
bad = [p.get("title", "?") for p in panels if not any(t.get("expr") for t in p.get("targets", []))]
if not dashboard.get("title") or not panels or bad:
    sys.exit(f"{path}: no title, no panels, or panels without a PromQL target: {bad}")
print(f"  SUCCESS: {path} is valid JSON: {len(panels)} panels")
PY
