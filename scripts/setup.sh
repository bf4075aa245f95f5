#!/usr/bin/env bash
# Installs renorm_convert into ./.venv on a bare Debian machine.
#   bash scripts/setup.sh        the tool and its data (Fashion-MNIST)
#   bash scripts/setup.sh test   the same, plus what the tests need
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    echo "setup: installing Debian's dataset-fashion-mnist (the real data the demo and tests use)"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "test" ]; then
    .venv/bin/python -m pip install -q -e ".[test]"
else
    .venv/bin/python -m pip install -q -e .
fi
echo "setup: done; the tool is .venv/bin/renorm-convert"
