# Run by each srun task (`bash node.sh CMD...`): CMD... with monitor.host set to this node's
# NodeAddr (the address Slurm uses for it, which the other nodes and a cluster's Prometheus
# reach), so the ranks' /metrics servers listen there and rank 0's discovery file names them
# there (local rank r on monitor.port + r). A monitor.host= of the user's own wins.
set -euo pipefail
for arg in "$@" ${FNE_ARGS:-}; do
  if [[ $arg == monitor.host=* ]] || [ -z "${SLURMD_NODENAME:-}" ]; then
    exec "$@"
  fi
done
ADDR=$(scontrol show node "$SLURMD_NODENAME" --oneliner | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
exec "$@" "monitor.host=${ADDR:-$SLURMD_NODENAME}"
