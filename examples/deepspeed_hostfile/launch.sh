#!/bin/bash
# zerovl with DeepSpeed's own launcher over the nodes of ./hostfile. Two forms:
#
#   1. From one node, over pdsh + passwordless ssh (DeepSpeed's default): it starts every node itself.
#        examples/deepspeed_hostfile/launch.sh CONFIG.yaml [key=value ...]
#      pdsh must be installed on this node, and `ssh worker-1 hostname` must work without a password.
#      Only variables starting with PYTHON, UCX, MV2 or MLFLOW are forwarded to the other nodes; put any
#      other (PATH of the virtualenv, NCCL_*, HF_HOME) in ~/.deepspeed_env or ./.deepspeed_env, one
#      KEY=VALUE per line.
#
#   2. Without ssh (containers, schedulers that start each node): run this on every node with its rank.
#        NODE_RANK=0 examples/deepspeed_hostfile/launch.sh CONFIG.yaml ...   # on worker-0
#        NODE_RANK=1 examples/deepspeed_hostfile/launch.sh CONFIG.yaml ...   # on worker-1
#      Here no launcher waits for the nodes: zerovl's ranks meet at MASTER_ADDR:MASTER_PORT, and a rank
#      that cannot (a node missing, a wrong address or port) stops after train.dist_timeout_s with one line:
#        zerovl: error: [rank 8] could not reach rank 0 (the master) at worker-0:29500 within 1800 s
#        (train.dist_timeout_s): ...; check MASTER_ADDR/MASTER_PORT and that every node started
#
# Every node must see the same paths: config, models, data and train.output_dir (where every rank
# writes its part of each checkpoint). Rerunning the command resumes from the newest checkpoint.
set -euo pipefail
CONFIG=${1:?usage: launch.sh CONFIG.yaml [key=value ...]}
shift
HOSTFILE=${HOSTFILE:-$(dirname "$0")/hostfile}
MASTER_ADDR=${MASTER_ADDR:-$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')}   # the first node
MASTER_PORT=${MASTER_PORT:-29500}

no_ssh=()
if [[ -n "${NODE_RANK:-}" ]]; then
    no_ssh=(--no_ssh --node_rank "$NODE_RANK")
fi
# --module: run `python -m zerovl` on every rank; the launcher's --local_rank argument is understood.
exec deepspeed --hostfile "$HOSTFILE" "${no_ssh[@]}" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --module zerovl train "$CONFIG" train.dist_timeout_s=1800 "$@"
