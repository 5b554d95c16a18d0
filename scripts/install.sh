#!/usr/bin/env bash
# Install hpcvae and everything its demo and tests need, on a fresh machine or an old one.
# Idempotent: a second run only checks.  Set HPCVAE_NO_DEEPSPEED=1 to skip DeepSpeed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check --progress-bar off -q"

# PyTorch first: DeepSpeed's build imports it.  Pin the CPU build when torch is absent, so a
# bare install does not pull several GB of CUDA wheels; on a GPU node install your CUDA torch first.
if ! $PY -c "import torch" 2>/dev/null; then
    echo "[install] torch"
    $PIP "torch==${HPCVAE_TORCH_VERSION:-2.13.0}" || $PIP torch --index-url https://download.pytorch.org/whl/cpu
fi
echo "[install] hpcvae and its dependencies"
$PIP -e ".[test]"
if [ -z "${HPCVAE_NO_DEEPSPEED:-}" ] && ! $PY -c "import deepspeed" 2>/dev/null; then
    echo "[install] deepspeed (source build, no ops pre-compiled)"
    DS_BUILD_OPS=0 $PIP --no-build-isolation "deepspeed>=0.14"
fi
