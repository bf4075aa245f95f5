#!/usr/bin/env bash
# Installs renorm_convert for each Keras backend and runs the test suite on
# each: TensorFlow (.venv, every test), then JAX (.venv-jax) and PyTorch
# (.venv-torch), whose venvs have no TensorFlow, so that a stray TensorFlow
# import fails there. Tests that need TensorFlow are skipped on the others.
# On JAX and PyTorch the tests marked slow (subprocesses, minutes of
# training: they run on TensorFlow) are left out unless ALL=1; on
# TensorFlow, the keras.applications sizes whose family another size
# covers (marked full_zoo) are.
#   bash scripts/test.sh                 all three backends
#   BACKENDS="jax" bash scripts/test.sh  only those named
#   ALL=1 bash scripts/test.sh           the slow tests on every backend,
#                                        the whole zoo on TensorFlow
#   bash scripts/test.sh -x -k schedule  extra arguments go to pytest
set -uo pipefail
cd "$(dirname "$0")/.."

BACKENDS="${BACKENDS:-tensorflow jax torch}"
status=0
for backend in $BACKENDS; do
    case "$backend" in
        tensorflow) venv=.venv ;;
        jax) venv=.venv-jax ;;
        torch) venv=.venv-torch ;;
        *) echo "test: unknown backend '$backend': use tensorflow, jax, torch" >&2
           exit 2 ;;
    esac
    log=$(mktemp)
    echo "== $backend: installing into $venv"
    if ! BACKEND="$backend" bash scripts/setup.sh test >"$log" 2>&1; then
        grep -v "^WARNING: Location" "$log"
        echo "test: setup for $backend failed"
        exit 1
    fi
    rm -f "$log"
    echo "== $backend: tests"
    start=$(date +%s)
    select=()
    if [ -z "${ALL:-}" ]; then
        if [ "$backend" = tensorflow ]; then
            select=(-m "not full_zoo")
        else
            select=(-m "not slow")
        fi
    fi
    KERAS_BACKEND="$backend" "$venv/bin/python" -m pytest -q \
        -p no:cacheprovider "${select[@]}" "$@" || status=1
    echo "== $backend: $(( $(date +%s) - start )) s"
done
exit $status
