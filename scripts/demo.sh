#!/usr/bin/env bash
# README command 1: synthetic galaxies -> shards -> training -> consolidated model -> PNG report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
exec python3 -m hpcvae.demo "$@"
