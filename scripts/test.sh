#!/usr/bin/env bash
# README command 2: install everything (SLURM dev cluster included), lint, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash slurm/dev-cluster/start.sh 4
export SLURM_CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
export DS_ACCELERATOR=cpu
echo "[test] ruff"
ruff check hpcvae tests benchmarks examples
ruff format --check hpcvae tests benchmarks examples
echo "[test] pytest"
python3 -m pytest "$@"
