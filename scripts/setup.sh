#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine (root) or a developer checkout:
#   * a virtual environment in .venv (override the interpreter with PYTHON=...)
#   * torch 2.13.0 (CPU) first, so nothing pulls a CUDA build
#   * mpidl in editable mode with the mpich, test, plot and data extras
#   * Debian's dataset-fashion-mnist (when root and the files are missing)
# Set MPIDL_NO_VENV=1 to install into the current interpreter instead.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${MPIDL_NO_VENV:-0}" != 1 ]; then
    if [ ! -x .venv/bin/python ]; then
        echo "[setup] creating .venv"
        "${PYTHON:-python3}" -m venv .venv
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi

stamp_dir=$(python -c 'import sys; print(sys.prefix)')
stamp="$stamp_dir/.mpidl-setup-$(sha1sum setup.py | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    python -c 'import torch' 2>/dev/null || { echo "[setup] installing torch 2.13.0 (CPU)"; python -m pip install -q torch==2.13.0; }
    echo "[setup] installing mpidl[mpich,test,plot,data]"
    python -m pip install -q -e ".[mpich,test,plot,data]"
    touch "$stamp"
fi

fm=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$fm" ] && [ -z "${MPIDL_DATA:-}" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "[setup] installing Debian's dataset-fashion-mnist"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "[setup] note: Fashion-MNIST not found; install Debian's dataset-fashion-mnist or set MPIDL_DATA" >&2
    fi
fi
