#!/usr/bin/env bash
# Installs renorm_convert into a virtual environment on a bare Debian machine.
#   bash scripts/setup.sh        the tool and its data (Fashion-MNIST), into .venv
#   bash scripts/setup.sh test   the same, plus what the tests need
# BACKEND=jax or BACKEND=torch installs that Keras backend instead of
# TensorFlow, into .venv-jax / .venv-torch (VENV=DIR chooses another place).
set -euo pipefail
cd "$(dirname "$0")/.."

BACKEND="${BACKEND:-tensorflow}"
case "$BACKEND" in
    tensorflow) VENV="${VENV:-.venv}"; EXTRAS="tensorflow" ;;
    jax) VENV="${VENV:-.venv-jax}"; EXTRAS="jax" ;;
    torch) VENV="${VENV:-.venv-torch}"; EXTRAS="torch" ;;
    *) echo "setup: BACKEND=$BACKEND: use tensorflow, jax or torch" >&2; exit 2 ;;
esac
if [ "${1:-}" = "test" ]; then
    EXTRAS="$EXTRAS,test"
    [ "$BACKEND" = tensorflow ] && EXTRAS="$EXTRAS,test-tensorflow"
fi

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    echo "setup: installing Debian's dataset-fashion-mnist (the real data the demo and tests use)"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PYTHON="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if [ "$BACKEND" = torch ]; then
    # PyTorch's CPU build (a plain `torch` from PyPI is a CUDA build of
    # several GB); TORCH_VERSION=... chooses another.
    "$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
echo "setup: done; the tool is $VENV/bin/renorm-convert (Keras backend: $BACKEND)"
if [ "$BACKEND" != tensorflow ]; then
    # The command line takes the one backend installed; Python code that
    # imports keras itself needs it named.
    echo "setup: the command line runs on $BACKEND, the one backend in $VENV;" \
         "in your own Python code set KERAS_BACKEND=$BACKEND before importing keras"
fi
