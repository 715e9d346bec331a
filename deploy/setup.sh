#!/usr/bin/env bash
# Set up a development checkout: system packages the tests use (a real Mosquitto
# broker, socat for serial ptys), then the virtual environment in .venv with the
# runtime, the train extra (torch==2.13.0, CPU), the ray extra (replay --ray; its
# tests start a real local Ray) and the dev tools.
# Idempotent: a second run only checks. Used by README command 1 and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto mosquitto-clients)
command -v socat >/dev/null 2>&1 || need_apt+=(socat)
if [ ${#need_apt[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing ${need_apt[*]} (apt)" >&2
    timeout 600 $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 900 $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PY --version)" >&2
    $PY -m venv .venv
fi
stamp=.venv/.edgefuse-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing edgefuse[train,dev,ray] into .venv" >&2
    timeout 1200 .venv/bin/python -m pip install -q --upgrade pip
    timeout 1800 .venv/bin/python -m pip install -q -e ".[train,dev,ray]"
    touch "$stamp"
fi
