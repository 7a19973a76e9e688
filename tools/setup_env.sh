#!/usr/bin/env bash
# Create the project's virtual environment in .venv and install everything into it:
# the packages of require.txt and requirements-dev.txt, Detectron2 (tools/install_detectron2.py)
# and this project in editable mode. A second run reuses the environment and installs nothing
# unless one of those files changed since the last complete run.
set -euo pipefail

cd "$(dirname "$0")/.."
venv=.venv
stamp="$venv/.skysense-setup-complete"
python="${PYTHON:-python3}"

fingerprint=$(cat require.txt requirements-dev.txt pyproject.toml tools/install_detectron2.py \
  tools/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$fingerprint" ] && [ -x "$venv/bin/python" ]; then
  echo "[setup] $venv is up to date; nothing to install"
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "[setup] $python is $("$python" --version 2>&1); Python 3.10 or newer is needed." \
      "Set PYTHON to another interpreter, for example PYTHON=python3.11." >&2
    exit 1
  fi
  echo "[setup] creating $venv with $("$python" --version 2>&1)"
  "$python" -m venv "$venv"
fi

echo "[setup] installing require.txt and requirements-dev.txt (torch alone is several GB)"
"$venv/bin/python" -m pip install --progress-bar on -r require.txt -r requirements-dev.txt

echo "[setup] installing Detectron2"
"$venv/bin/python" tools/install_detectron2.py

echo "[setup] installing skysense_o in editable mode"
"$venv/bin/python" -m pip install --no-deps --no-build-isolation --editable .

echo "$fingerprint" > "$stamp"
echo "[setup] done: activate with 'source $venv/bin/activate'"
