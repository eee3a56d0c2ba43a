#!/usr/bin/env bash
# One-time setup on a fresh machine: the embedded default data package and a venv with the
# project installed (editable) plus test dependencies. Safe to rerun: it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [[ ! -f $FMNIST ]]; then
  echo "[setup] installing Debian package dataset-fashion-mnist (embedded default data)"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
if ! .venv/bin/python -c "import noisystudent, torch, torchvision, timm, albumentations, webdataset, distributed, mlflow, skimage, pytest, xdist, pytest_timeout, dask_jobqueue, dask_kubernetes, s3fs, moto.server, gcsfs, gcp_storage_emulator, ruff" 2>/dev/null; then
  echo "[setup] installing noisystudent and its dependencies into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev]"
fi
# Label Studio (tests/label_studio_server.py) pins its own Django and friends: a venv of its own.
if [[ ! -x .venv-label-studio/bin/label-studio ]]; then
  echo "[setup] installing label-studio into .venv-label-studio (about 1 GB)"
  $PY -m venv .venv-label-studio
  .venv-label-studio/bin/python -m pip install -q --upgrade pip
  .venv-label-studio/bin/python -m pip install -q label-studio==1.23.2
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, timm; print(f"torch {torch.__version__}, timm {timm.__version__}")')"
