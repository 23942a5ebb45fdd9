#!/usr/bin/env bash
# The perf suite in one GPU call: versions, the grid (N times), JSON and tables into $OUT.
#
#   bash perf/gpu_session.sh                      # one full run (compared if this GPU has a baseline)
#   REPEAT=3 bash perf/gpu_session.sh             # three runs: spread -> OUT/thresholds.json
#   GRID=quick bash perf/gpu_session.sh -k flex   # other args go to `python -m attention.bench.perf run`
#
# Env: OUT (default .benchmarks/attention-perf), REPEAT (1), GRID (full), BUDGET_S (total seconds for the grid runs,
# default 500: the device call's limit is 600), COMPARE (auto | 0 | 1). Files in OUT: run-N.json,
# cases.jsonl, pytest.log, summary.txt, thresholds.json (REPEAT >= 2): at most 8 with REPEAT <= 4.
# A run cut short by the time limit keeps the cases it finished (pytest is interrupted, not killed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-.benchmarks/attention-perf}"
REPEAT="${REPEAT:-1}"
GRID="${GRID:-full}"
BUDGET_S="${BUDGET_S:-500}"
COMPARE="${COMPARE:-auto}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python - <<'PY'
import platform, torch
print(f"python {platform.python_version()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
      f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
try:
    import triton; print(f"triton {triton.__version__}")
except Exception as exc:
    print(f"triton: {exc}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, L2 {p.L2_cache_size >> 20} MiB")
PY
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>/dev/null || true

if ! python -c "import nox" 2>/dev/null && [ -d .whl ]; then
    PIP_BREAK_SYSTEM_PACKAGES=1 python -m pip install -q --no-index --find-links .whl nox 2>&1 | tail -2 \
        || echo "nox wheels incomplete here: running python -m attention.bench.perf directly (what nox -s perf runs)"
fi

if [ "$COMPARE" = auto ]; then
    slug=$(python -c "import torch; from attention.bench.perf.machine import machine_info; print(machine_info('cuda')['slug'] if torch.cuda.is_available() else 'cpu')")
    if [ -f "perf/baselines/$slug/baseline.json" ]; then COMPARE=1; else COMPARE=0; echo "no baseline for $slug yet: not comparing"; fi
fi
args=(--out "$OUT" --repeat "$REPEAT" --grid "$GRID" --quiet-pytest --time-budget "$BUDGET_S")
[ "$COMPARE" = 1 ] && args+=(--benchmark-compare)
args+=("$@")

start=$SECONDS
if python -c "import nox" 2>/dev/null; then
    python -m nox --no-venv -s perf -- "${args[@]}"
else
    python -m attention.bench.perf run "${args[@]}"
fi
rc=$?
echo "perf: exit $rc after $((SECONDS - start)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $rc
