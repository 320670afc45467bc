# Sourced by the cluster/slurm/*.sbatch scripts: what every launch shares.
#   sbatch cluster/slurm/<launcher>.sbatch CONFIG [key=value ...]
# The config is the first argument (FNE_CONFIG when there is none); further arguments are
# overrides, as on the `python -m fne_dist.train` command line.
#   FNE_ENV_SETUP     a file sourced before anything runs: the site's `module load`, conda or
#                     venv activation, NCCL variables (default: none)
#   FNE_PYTHON        interpreter with fne_dist installed            (default: python3)
#   FNE_ARGS          more key=value overrides, space-separated       (default: none)
#   FNE_PROM_TARGETS  directory the cluster's Prometheus reads discovery files from
#                     (default: cluster/prometheus/targets of the submit dir, where the
#                     shipped prometheus.yml looks; empty: no targets file)
# A job requeued by Slurm (pre-emption, node failure, the USR1 time-limit signal below: same
# job id, SLURM_RESTART_COUNT > 0) resumes from its newest checkpoint by itself; a new
# submission resumes only when its overrides say checkpoint.resume=...
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
if [ -n "${FNE_ENV_SETUP:-}" ]; then
  echo "site set-up: sourcing ${FNE_ENV_SETUP}"
  set +u  # activation scripts (conda, modules) read unset variables
  # shellcheck disable=SC1090  # the site's own file
  source "$FNE_ENV_SETUP"
  set -u
fi
PY=${FNE_PYTHON:-python3}
CONFIG=${1:-${FNE_CONFIG:-}}
if [ -z "$CONFIG" ]; then
  echo "error: no config: sbatch $0 CONFIG [key=value ...] (or FNE_CONFIG=...)" >&2
  exit 2
fi
read -r -a EXTRA <<< "${FNE_ARGS:-}"
EXTRA+=("${@:2}")
# The training resumes a requeued job by itself (it reads SLURM_RESTART_COUNT, inherited by
# every step): from the newest checkpoint, or afresh when the first attempt wrote none (an
# explicit checkpoint.resume=latest would fail there).
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
  echo "requeued job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT}): resuming from the newest checkpoint"
fi
# Since Slurm 22.05 srun no longer inherits --cpus-per-task from the batch step: without this a
# per-node launcher (torchrun, deepspeed) with 4-8 ranks would get one core.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi
echo "slurm: job ${SLURM_JOB_ID}, ${SLURM_NNODES:-1} node(s), ${SLURM_CPUS_PER_TASK:-1} CPU(s) per task, config ${CONFIG}"
# Rank 0's host, at the address Slurm uses for it (node names need not resolve), and a port
# derived from the job id (20000-29999: below the ephemeral range, the same for every task).
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_ADDR=$(scontrol show node "$HEAD_NODE" --oneliner | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
HEAD_ADDR=${HEAD_ADDR:-$HEAD_NODE}
HEAD_PORT=$((20000 + SLURM_JOB_ID % 1000 * 10 + 9))
# Prometheus file discovery: rank 0 writes every rank's /metrics target here (the shipped
# prometheus.yml reads targets/*.json; ray.sbatch copies Ray's own file to targets/ray/).
PROM_TARGETS=${FNE_PROM_TARGETS-$PWD/cluster/prometheus/targets}
MONITOR_ARGS=()
if [ -n "$PROM_TARGETS" ]; then
  MONITOR_ARGS+=("monitor.targets_file=${PROM_TARGETS}/fne-${SLURM_JOB_ID}.json")
fi
# Each srun task runs through node.sh, which binds the ranks' /metrics to its node's NodeAddr
# (the address the other nodes, and the cluster's Prometheus, reach it at).
NODE_SH=$PWD/cluster/slurm/node.sh

# Pre-emption and the time limit: `#SBATCH --signal=B:USR1@300` has Slurm send USR1 to this
# shell 300 s before the end; it passes SIGTERM to the training step, whose ranks write a
# checkpoint if one fits checkpoint.stop_grace_s and exit 75, and then the job requeues itself
# (and resumes, above). A pre-empting scheduler's own SIGTERM reaches the ranks directly.
PREEMPTED=""
preempt() {
  PREEMPTED=$1
  echo "pre-emption: $1 received, asking the ranks to checkpoint and stop"
  scancel --signal=TERM "$SLURM_JOB_ID"  # every step's tasks, not this batch shell
}
trap 'preempt USR1' USR1

# run_step CMD...: the training step in the background, so that a signal's trap runs at once
# (bash runs traps only between commands); then requeues the job if it was pre-empted.
run_step() {
  "$@" &
  local pid=$! rc=0
  while kill -0 "$pid" 2> /dev/null; do
    rc=0
    wait "$pid" || rc=$?
  done
  if [ -n "$PREEMPTED" ] && [ "$rc" -ne 0 ]; then  # exit 0: it finished before the signal
    echo "pre-emption: training step ended (exit ${rc}); requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  return "$rc"
}
