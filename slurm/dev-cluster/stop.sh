#!/usr/bin/env bash
# Stop the dev cluster started by start.sh: every daemon through its PID file, nothing by name.
#   slurm/dev-cluster/stop.sh [--wipe]    # --wipe also deletes job state, spool and logs
set -uo pipefail

ROOT="${HPCVAE_SLURM_ROOT:-/var/lib/hpcvae-slurm}"
RUN="$ROOT/run"

stop_pidfile() {  # stop_pidfile FILE NAME
  local f=$1 name=$2 pid
  [[ -s "$f" ]] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "[dev-cluster] $name ($pid) ignored SIGTERM for 10s; sending SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null
    fi
    echo "[dev-cluster] stopped $name ($pid)" >&2
  fi
  rm -f "$f"
}

# Compute daemons first, the controller next, accounting and auth last.
for f in "$RUN"/slurmd-*.pid; do
  [[ -e "$f" ]] || continue
  n=$(basename "$f" .pid)
  stop_pidfile "$f" "$n"
done
stop_pidfile "$RUN/slurmctld.pid" slurmctld
stop_pidfile "$RUN/slurmdbd.pid" slurmdbd
stop_pidfile "$RUN/mariadbd.pid" mariadbd
stop_pidfile "$RUN/munged.pid" munged

if [[ "${1:-}" == "--wipe" ]]; then
  rm -rf "$ROOT/state" "$ROOT/spool" "$ROOT/log" "$ROOT/nodes"
  echo "[dev-cluster] wiped $ROOT/{state,spool,log}" >&2
fi
exit 0
