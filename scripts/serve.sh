#!/usr/bin/env bash
# Installs everything, then serves SPD-SAM on the sample studies at http://127.0.0.1:8000.
# Extra arguments go to `monailabel start_server` (e.g. --conf backbone vit_b --conf checkpoint /path).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m monailabel.main start_server --app apps/spd_sam --studies sample_studies \
  --host 127.0.0.1 --port 8000 "$@"
