#!/usr/bin/env bash
# One run of bench/gpu_check.py on a fresh GPU machine with no network (the `run` device tool runs it
# from the repository root; $OUT, when set, is the folder whose files come back).
#
#   bash bench/gpu_run.sh            # prints progress, then the JSON object as the last line
#
# - python: the first of python3, /opt/torch/.venv/bin/python3, python whose torch sees a GPU (the
#   device image's python3 holds a CUDA torch); else any with torch (then gpu_check runs its CPU mode).
# - watchtower without pip: nothing can be installed there, so a temporary folder on PYTHONPATH holds
#   a copy of watchtower/ with the folders pyproject maps into it (hooks, tui, dashboards, alerts,
#   configs) linked in. Its imports need only torch, prometheus_client, psutil, fsspec, pynvml
#   (nvidia-ml-py), all in the device image; a missing one is named and the run stops (exit 2).
# - promtool: used from .devtools/promtool when that was carried (cp /usr/bin/promtool .devtools/);
#   without it the scrape part says "skipped" and the bodies kept in $OUT can be checked later.
# Results: $OUT/gpu_check.json (the JSON), $OUT/gpu_check.log (progress, tracebacks),
# $OUT/metrics.prom and $OUT/metrics.openmetrics.txt (the scraped /metrics bodies).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"

PY=""
for cand in python3 /opt/torch/.venv/bin/python3 python; do
    if command -v "$cand" >/dev/null 2>&1 &&
        "$cand" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        PY=$(command -v "$cand"); break
    fi
done
if [ -z "$PY" ]; then
    for cand in python3 python; do
        if "$cand" -c 'import torch' 2>/dev/null; then PY=$(command -v "$cand"); break; fi
    done
fi
[ -n "$PY" ] || { echo "gpu_run: no python with torch on this machine" >&2; exit 2; }

SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
cp -r watchtower "$SHIM/watchtower"
for folder in hooks tui dashboards alerts configs; do ln -s "$REPO/$folder" "$SHIM/watchtower/$folder"; done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if [ -x .devtools/promtool ]; then export PATH="$REPO/.devtools:$PATH"; fi

"$PY" - <<'PY' || exit 2
import importlib, sys, watchtower, torch
missing = [m for m in ("prometheus_client", "psutil", "fsspec", "pynvml") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_run: missing python packages: {', '.join(missing)} (carry them as wheels, see the device README)")
print(f"gpu_run: {sys.executable} {sys.version.split()[0]}, torch {torch.__version__}, "
      f"cuda {torch.cuda.is_available()}, watchtower from {watchtower.__file__}", file=sys.stderr)
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv,noheader >&2
echo "gpu_run: promtool: $(command -v promtool || echo 'not found')" >&2

"$PY" bench/gpu_check.py --out "$OUT" "$@" > "$OUT/gpu_check.json" 2> >(tee "$OUT/gpu_check.log" >&2)
status=$?
wait
tail -n 1 "$OUT/gpu_check.json"
exit $status
