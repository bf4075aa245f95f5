#!/usr/bin/env bash
# The GPU check: on a machine with a GPU, Python 3.12, JAX and PyTorch with
# CUDA, numpy, h5py, networkx, onnx, onnxruntime, matplotlib, scikit-learn,
# but no TensorFlow, no Keras and no package registry, it runs the GPU tests
# (tests/test_gpu.py, marker `gpu`), a few backend-neutral test files and
# benchmarks/gpu.py, for KERAS_BACKEND=jax and torch, and prints the GPU's
# name, the test results and the benchmark ratios. Under 8 minutes in all:
# every step has a timeout cut to what is left of GPU_CHECK_LIMIT_S.
#
# Keras and what it needs that such a machine lacks come as wheels in .whl/
# beside the checkout (gitignored). Fetch them where a registry is reachable:
#
#   for p in keras==3.15.1 namex optree ml_dtypes absl-py rich markdown-it-py \
#            mdurl pygments packaging typing_extensions pytest iniconfig pluggy \
#            onnxscript onnx-ir; do
#     pip download --python-version 3.12 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
#       --only-binary=:all: --no-deps -d .whl "$p"
#   done
#
# (keras's full dependency set for Python 3.12, plus pytest's and what
# PyTorch's ONNX exporter writes with, each with --no-deps; optree and
# ml_dtypes ship manylinux_2_27/2_28 wheels only.)
# Only the wheels whose modules the machine's Python cannot import already
# are installed (Keras always), into a scratch folder put on PYTHONPATH
# before the machine's own packages, so its JAX, PyTorch and NumPy are used
# whether its python3 is a system Python, a venv or conda; the package itself
# runs from the checkout (PYTHONPATH too: nothing is built, nothing fetched).
#
#   bash scripts/gpu-check.sh                     on the GPU machine
#   GPU_CHECK_SMALL=1 bash scripts/gpu-check.sh   rehearsal on a CPU
#
# Settings: PYTHON (default python3), GPU_CHECK_BACKENDS (default "jax
# torch"), GPU_CHECK_LIMIT_S (default 465: the whole run), GPU_CHECK_DIR
# (scratch folder and full logs; default $OUT/gpu-check when $OUT is set,
# else a new folder under /tmp), GPU_CHECK_SMALL=1 (benchmark --small),
# GPU_CHECK_TESTS_ON_CPU=1 (run the gpu tests' logic without a GPU too:
# RENORM_CONVERT_GPU_TESTS_ON_CPU=1), GPU_CHECK_FAST_TESTS (the test files
# run besides tests/test_gpu.py; default "tests/test_layers.py
# tests/test_schedule.py").
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

START=$(date +%s)
LIMIT=${GPU_CHECK_LIMIT_S:-465}
DEADLINE=$((START + LIMIT))
PYTHON=${PYTHON:-python3}
BACKENDS=${GPU_CHECK_BACKENDS:-"jax torch"}
SMALL=${GPU_CHECK_SMALL:-0}
FAST_TESTS=${GPU_CHECK_FAST_TESTS:-"tests/test_layers.py tests/test_schedule.py"}
if [ -n "${GPU_CHECK_DIR:-}" ]; then
    WORK=$GPU_CHECK_DIR
elif [ -n "${OUT:-}" ]; then
    WORK=$OUT/gpu-check
else
    WORK=$(mktemp -d /tmp/renorm-gpu-check.XXXXXX)
fi
SITE=$WORK/site
LOGS=$WORK/logs
mkdir -p "$SITE" "$LOGS"
SUMMARY=$LOGS/summary.txt
: >"$SUMMARY"

elapsed() { echo $(( $(date +%s) - START )); }
note() { echo "$*" | tee -a "$SUMMARY"; }
say() { echo "[$(printf '%4d' "$(elapsed)")s] $*"; }

# --- 1. Keras from .whl/, the package from the checkout ---------------------

say "gpu-check: python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'), work folder $WORK"
if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu-check: no wheels in .whl/: fetch them as this script's header says" >&2
    exit 2
fi
# The wheels whose top-level modules are not importable here (keras always).
NEEDED=$("$PYTHON" - .whl/*.whl <<'EOF'
import importlib.util, sys, zipfile
for wheel in sys.argv[1:]:
    names = set()
    for entry in zipfile.ZipFile(wheel).namelist():
        top = entry.split("/")[0]
        if top.endswith((".dist-info", ".data")) or top.startswith("_"):
            continue
        if "/" not in entry and not top.endswith(".py"):
            continue
        names.add(top[:-3] if top.endswith(".py") else top)
    keras = wheel.split("/")[-1].startswith("keras-")
    if keras or not all(importlib.util.find_spec(n) for n in names):
        print(wheel)
EOF
)
if [ -n "$NEEDED" ]; then
    say "installing into $SITE: $(echo $NEEDED | xargs -n1 basename | tr '\n' ' ')"
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
        # shellcheck disable=SC2086
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
            --disable-pip-version-check --no-warn-script-location \
            --target "$SITE" $NEEDED || { echo "gpu-check: pip install failed" >&2; exit 1; }
    else  # no pip: a wheel is a zip of what site-packages holds
        # shellcheck disable=SC2086
        "$PYTHON" -c 'import sys, zipfile
for w in sys.argv[2:]: zipfile.ZipFile(w).extractall(sys.argv[1])' "$SITE" $NEEDED
    fi
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 TF_CPP_MIN_LOG_LEVEL=2

if command -v nvidia-smi >/dev/null 2>&1; then
    GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>&1 | paste -sd ';')
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
else
    GPU_NAME="none (no nvidia-smi)"
fi
note "GPU (nvidia-smi): $GPU_NAME"

for backend in $BACKENDS; do
    KERAS_BACKEND=$backend timeout -k 5 60 "$PYTHON" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import keras
from renorm_convert._internal import backend as _backend
name = keras.backend.backend()
if name == "jax":
    import jax
    extra = f"JAX {jax.__version__}, devices {jax.devices()}"
elif name == "torch":
    import torch
    extra = (f"PyTorch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"cuda available {torch.cuda.is_available()}")
else:
    extra = ""
print(f"{name}: Keras {keras.__version__}, {extra}; has_gpu="
      f"{_backend.has_gpu()}, device_names={_backend.device_names()}")
EOF
done

# --- 2. the steps, most important first, each within what is left -----------

# step LABEL MAX_S RESERVE_S LOGNAME command...: runs the command with a
# timeout of MAX_S, cut so that RESERVE_S seconds stay for the steps after
# it; skipped when under 20 s would be left.
step() {
    local label=$1 max=$2 reserve=$3 log=$LOGS/$4.log
    shift 4
    local left=$(( DEADLINE - $(date +%s) - reserve ))
    local t=$(( max < left ? max : left ))
    STEP_SKIPPED=0 STEP_LOG=$log STEP_RC=0 STEP_S=0
    if [ "$t" -lt 20 ]; then
        note "$label: SKIPPED (no time left)"
        STEP_SKIPPED=1 STEP_RC=124
        return
    fi
    say "$label (timeout ${t}s) ..."
    local t0
    t0=$(date +%s)
    STEP_T=$t
    timeout -k 10 "$t" "$@" >"$log" 2>&1
    STEP_RC=$?
    STEP_S=$(( $(date +%s) - t0 ))
}

pytest_line() {  # the closing line of a pytest log, or why there is none
    local line
    line=$(grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|deselected|error)|no tests ran" "$STEP_LOG" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
    if [ "$STEP_RC" = 124 ] || [ "$STEP_RC" = 137 ]; then
        echo "TIMEOUT after ${STEP_T}s ($(grep -cE ' PASSED| FAILED| SKIPPED| ERROR' "$STEP_LOG") tests done: $(grep -cE ' FAILED| ERROR' "$STEP_LOG") failed)"
    else
        echo "${line:-exit $STEP_RC, no pytest summary (see $STEP_LOG)}"
    fi
}

PYTEST=("$PYTHON" -m pytest -p no:cacheprovider -v --durations=5 -rfEs)
ON_CPU=0 SCALE=1  # the gpu tests' logic on a CPU is slower: longer caps
[ "${GPU_CHECK_TESTS_ON_CPU:-0}" = 1 ] && ON_CPU=1 SCALE=3
STATUS=0
n_backends=$(echo $BACKENDS | wc -w)

i=0
for backend in $BACKENDS; do
    i=$((i + 1))
    max=$(( SCALE * $([ "$backend" = jax ] && echo 150 || echo 120) ))
    later=$(( (n_backends - i) * 40 + n_backends * 40 + n_backends * 60 ))
    step "$backend: pytest -m gpu tests/test_gpu.py" "$max" "$later" "$backend-gpu-tests" \
        env KERAS_BACKEND="$backend" RENORM_CONVERT_GPU_TESTS_ON_CPU=$ON_CPU \
        "${PYTEST[@]}" -m gpu tests/test_gpu.py
    if [ "$STEP_SKIPPED" = 1 ]; then STATUS=1; continue; fi
    result=$(pytest_line)
    note "$backend: gpu tests: $result (${STEP_S}s)"
    grep -E "^(FAILED|ERROR) " "$STEP_LOG" | head -8 | sed 's/^/    /' | tee -a "$SUMMARY"
    # Skips, one line per reason: on a GPU machine none should say "needs a GPU".
    grep -E "^SKIPPED \[" "$STEP_LOG" | sed -E 's/^SKIPPED \[([0-9]+)\] [^ ]*: /\1 skipped: /' \
        | awk '{n=$1; $1=""; c[$0]+=n} END {for (r in c) printf "    %d%s\n", c[r], r}' | tee -a "$SUMMARY"
    grep -E "^[0-9.]+s (call|setup) " "$STEP_LOG" | head -3 | sed 's/^/    slowest: /' | tee -a "$SUMMARY"
    [ "$STEP_RC" = 0 ] || STATUS=1
done

# The mission on PyTorch, on the GPU: convert a reference model, fine-tune
# it briefly in microbatches, export it to ONNX and verify it on real
# images. cuDNN's TensorFloat-32 convolutions differ from onnxruntime's
# float32 by about the verification's tolerance: off here.
if [[ " $BACKENDS " == *" torch "* ]]; then
    MISSION=$WORK/mission
    mkdir -p "$MISSION"
    step "torch: convert, finetune, export" 150 $(( n_backends * 100 + 60 )) \
        torch-mission env KERAS_BACKEND=torch NVIDIA_TF32_OVERRIDE=0 bash -c "
        set -e
        $PYTHON -m renorm_convert convert renorm_convert/reference/resnet_fmnist.keras \
            -o $MISSION/renorm.keras --microbatch 4
        $PYTHON -m renorm_convert finetune $MISSION/renorm.keras -o $MISSION/tuned.keras \
            --data digits --epochs 1 --momentum 0.9 --quiet-progress
        $PYTHON -m renorm_convert export $MISSION/tuned.keras -o $MISSION/tuned.onnx \
            --data digits"
    if [ "$STEP_SKIPPED" = 0 ]; then
        note "torch: mission (exit $STEP_RC, ${STEP_S}s):"
        grep -E "^(validation accuracy|trained|wrote|  same top-1|  logits|renorm-convert)" \
            "$STEP_LOG" | sed 's/^/    /' | tee -a "$SUMMARY"
        [ "$STEP_RC" = 0 ] || STATUS=1
    fi
fi

i=0
for backend in $BACKENDS; do
    i=$((i + 1))
    max=$([ "$backend" = jax ] && echo 110 || echo 90)
    later=$(( (n_backends - i) * 40 + n_backends * 60 ))
    args=(--budget $(( max - 25 )))
    [ "$SMALL" = 1 ] && args=(--small "${args[@]}")
    step "$backend: benchmarks/gpu.py ${args[*]}" "$max" "$later" "$backend-benchmark" \
        env KERAS_BACKEND="$backend" "$PYTHON" benchmarks/gpu.py "${args[@]}"
    if [ "$STEP_SKIPPED" = 1 ]; then STATUS=1; continue; fi
    if grep -q "^RATIO " "$STEP_LOG" 2>/dev/null; then
        note "$backend: benchmark ($STEP_S s, exit $STEP_RC):"
        grep "^RATIO " "$STEP_LOG" | sed 's/^RATIO /    /' | tee -a "$SUMMARY"
        grep -E "skipped \(" "$STEP_LOG" | sed 's/^/    /' | tee -a "$SUMMARY"
    else
        note "$backend: benchmark: no ratios (exit $STEP_RC, ${STEP_S:-0}s); last lines:"
        tail -5 "$STEP_LOG" 2>/dev/null | sed 's/^/    /' | tee -a "$SUMMARY"
    fi
    [ "$STEP_RC" = 0 ] || STATUS=1
done

i=0
for backend in $BACKENDS; do
    i=$((i + 1))
    later=$(( (n_backends - i) * 60 ))
    # GPUs compute float32 products in TensorFloat-32 by default; these
    # files compare with NumPy at float32 tolerances.
    # shellcheck disable=SC2086
    step "$backend: pytest $FAST_TESTS" 150 "$later" "$backend-tests" \
        env KERAS_BACKEND="$backend" JAX_DEFAULT_MATMUL_PRECISION=highest \
        NVIDIA_TF32_OVERRIDE=0 "${PYTEST[@]}" $FAST_TESTS
    if [ "$STEP_SKIPPED" = 1 ]; then STATUS=1; continue; fi
    note "$backend: $FAST_TESTS: $(pytest_line) (${STEP_S:-0}s)"
    grep -E "^(FAILED|ERROR) " "$STEP_LOG" 2>/dev/null | head -8 | sed 's/^/    /' | tee -a "$SUMMARY"
    [ "$STEP_RC" = 0 ] || STATUS=1
done

echo
echo "=================== gpu-check summary ($(elapsed)s, full logs in $LOGS) ==================="
cat "$SUMMARY"
echo "gpu-check: $([ $STATUS = 0 ] && echo OK || echo 'FAILURES (see above)') in $(elapsed)s"
exit $STATUS
