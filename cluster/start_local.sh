#!/usr/bin/env bash
# A multi-node Ray cluster on one machine: a head plus N worker nodes, each its own raylet, so
# the cluster has several nodes. For trying the cluster code paths on one machine.
#
#   cluster/start_local.sh 2 1    # head + 2 worker nodes, 1 CPU each; prints the dashboard address
#   ray stop --force              # tears all of them down
#
# Token auth (Ray's default) needs a token before `ray start`; job submission needs RAY_AUTH_MODE.
# RAY_PORT, RAY_DASHBOARD_PORT and RAY_TMPDIR choose the ports and the temp dir (default /tmp/ray;
# worker node i uses <temp dir>/node_i).
# Every node gets the repository root and platform/ on PYTHONPATH, as the image does on KubeRay
# (cluster/Dockerfile): `serve deploy serve_apps/config.yaml` then imports serve_apps.openai_app
# and strata on any node, since a Serve config cannot upload a local working_dir.
# Checked here: head + 1 worker node, then `RAY_ADDRESS=auto strata run --workers 2 ...` trained and
# evaluated a task (one machine, so both raylets share an IP and Ray Train reports node_rank 0).
set -euo pipefail
NODES="${1:-1}"
CPUS="${2:-1}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT:$ROOT/platform${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"  # the nodes' processes start here: relative paths in serve_apps/config.yaml are from the root
PORT="${RAY_PORT:-6380}"
DASHBOARD="${RAY_DASHBOARD_PORT:-8265}"
BASE="${RAY_TMPDIR:-/tmp/ray}"
ray get-auth-token --generate >/dev/null
# Every node's dashboard agent takes a free port (0), not the default 52365: nodes on one machine,
# or another Ray on it, would leave all but the first without the HTTP service, and a head agent
# without it makes `ray job submit` answer "No available agent to submit job" for good.
ray start --head --port="$PORT" --num-cpus="$CPUS" --temp-dir="$BASE" --dashboard-host=127.0.0.1 \
    --dashboard-port="$DASHBOARD" --include-dashboard=true --dashboard-agent-listen-port=0 \
    --disable-usage-stats >/dev/null
for i in $(seq "$NODES"); do
    # Each worker node advertises `worker_node` (train.resources_per_worker: {worker_node: 1} puts
    # one Train worker per node) and its own `worker_<i>` (to place work on a chosen node).
    # Each node has its own temp dir, as separate machines would: nodes that share one unpack a
    # job's working_dir into the same directory, and a node unpacking it anew (when its first
    # worker of the job starts) deletes the directory that the job's driver runs in.
    ray start --address="127.0.0.1:$PORT" --num-cpus="$CPUS" --resources="{\"worker_node\": 1, \"worker_$i\": 1}" \
        --temp-dir="$BASE/node_$i" --dashboard-agent-listen-port=0 --disable-usage-stats >/dev/null
done
echo "cluster up: head + $NODES worker node(s), $CPUS CPU(s) each; dashboard http://127.0.0.1:$DASHBOARD"
echo "then: export RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:$DASHBOARD"
echo "      ray job submit --working-dir . -- python -m jobs.stream ... --out \$PWD/runs/stream"
echo "      serve deploy serve_apps/config.yaml --address \$RAY_ADDRESS"
