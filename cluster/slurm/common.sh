# Sourced by the cluster/slurm/*.sbatch scripts: what every launch shares.
#   FNE_PYTHON  interpreter with fne_dist installed      (default: python3)
#   FNE_CONFIG  training config                           (default: configs/default.yaml)
#   FNE_ARGS    extra key=value overrides, space-separated (default: none)
# A job requeued by Slurm (preemption, node failure: same job id, SLURM_RESTART_COUNT > 0)
# resumes from its newest checkpoint by itself; a new submission resumes only when
# FNE_ARGS says checkpoint.resume=...
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
PY=${FNE_PYTHON:-python3}
CONFIG=${FNE_CONFIG:-configs/default.yaml}
read -r -a EXTRA <<< "${FNE_ARGS:-}"
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
  EXTRA+=("checkpoint.resume=latest")
  echo "requeued job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT}): resuming from the newest checkpoint"
fi
# Rank 0's host, at the address Slurm uses for it (node names need not resolve), and a port
# derived from the job id (20000-29999: below the ephemeral range, the same for every task).
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_ADDR=$(scontrol show node "$HEAD_NODE" --oneliner | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
HEAD_ADDR=${HEAD_ADDR:-$HEAD_NODE}
HEAD_PORT=$((20000 + SLURM_JOB_ID % 1000 * 10 + 9))
