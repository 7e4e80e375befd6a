#!/usr/bin/env bash
# The cluster on one machine, with the real parts: a Ray head (`ray start --head`, dashboard on 127.0.0.1) and an
# MLflow tracking server on 127.0.0.1 with a sqlite database and a local artifact root. Both are stopped by PID:
# `ray stop` would stop every Ray on the machine, other people's included.
#
#   cluster/local.sh start            # head + MLflow server, then prints what `env` prints
#   eval "$(cluster/local.sh env)"    # RAY_API_SERVER_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH, MLFLOW_TRACKING_URI
#   ray job submit --working-dir . -- python jobs/pretrain.py
#   cluster/local.sh status
#   cluster/local.sh stop
#   cluster/local.sh start-ray | stop-ray | start-mlflow | stop-mlflow    # one part at a time
#
# Settings, from the environment [default]:
#   VIT_CLUSTER_DIR         state: pids, ports, token, mlflow.db, mlartifacts/, logs/ [./.cluster]
#   RAY_GCS_PORT [6379]  RAY_DASHBOARD_PORT [8265]  RAY_CLIENT_PORT [10001]  RAY_AGENT_PORT [52365]  MLFLOW_PORT [5000]
#   RAY_NUM_CPUS            logical CPUs of the head [2 x cores: Ray Data decode finds CPUs beside the Train workers]
#   RAY_AUTH                token | disabled [token]; the token is $RAY_AUTH_TOKEN, else one generated into
#                           $VIT_CLUSTER_DIR/auth_token
#   RAY_AUTOSCALING_CONFIG  a fake_multinode cluster config (cluster/local-autoscaling.yaml): the head holds no CPUs
#                           and Ray's autoscaler starts and stops worker nodes on this machine
#   RAY_TEMP_DIR            Ray's session folder; short, Unix sockets live in it [/tmp/vit-ray-<uid>-<gcs port>]
#   MLFLOW_WORKERS          server worker processes [1]
#   VIT_PYTHON_BIN          folder with python, ray and mlflow [.venv/bin of this checkout if present, else PATH]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${VIT_CLUSTER_DIR:-$PWD/.cluster}"
case "$STATE" in /*) ;; *) STATE="$PWD/$STATE" ;; esac
if [[ -n "${VIT_PYTHON_BIN:-}" ]]; then
  BIN="$VIT_PYTHON_BIN"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  BIN="$ROOT/.venv/bin"
else
  BIN="$(dirname "$(command -v python3)")"
fi

die() { echo "local.sh: $*" >&2; exit 1; }

make_state() {
  mkdir -p "$STATE/logs"
  [[ -f "$STATE/.gitignore" ]] || echo '*' > "$STATE/.gitignore"  # state, never committed
}

# PIDs of every process of this head: those naming its session folder or its GCS port (Ray's client server), the
# `ray start --block` process, and all their descendants (workers, job drivers, fake worker nodes), from one `ps`.
ray_pids() (  # a subshell: ray.env must not leak into the caller's settings
  [[ -f "$STATE/ray.env" ]] || exit 0
  # shellcheck disable=SC1091
  source "$STATE/ray.env"
  ps -eo pid=,ppid=,args= | T="$RAY_TEMP_DIR" P="$RAY_GCS_PORT" R="$(cat "$STATE/ray.pid" 2>/dev/null || true)" \
    awk '{ parent[$1] = $2
           if (index($0, ENVIRON["T"] "/") || $1 == ENVIRON["R"] ||
               (index($0, "ray.util.client.server") && index($0, ":" ENVIRON["P"] " "))) mark[$1] = 1 }
         END { do { grew = 0; for (p in parent) if (!(p in mark) && (parent[p] in mark)) { mark[p] = 1; grew = 1 } }
               while (grew); for (p in mark) print p }'
)

# The MLflow server's PID (only if it still is our server) and its descendants (the uvicorn workers).
mlflow_pids() {
  local pid
  pid="$(cat "$STATE/mlflow.pid" 2>/dev/null || true)"
  [[ -n "$pid" ]] && tr '\0' ' ' 2>/dev/null < "/proc/$pid/cmdline" | grep -qF "$STATE/mlflow.db" || return 0
  ps -eo pid=,ppid= | R="$pid" awk '{ parent[$1] = $2; if ($1 == ENVIRON["R"]) mark[$1] = 1 }
    END { do { grew = 0; for (p in parent) if (!(p in mark) && (parent[p] in mark)) { mark[p] = 1; grew = 1 } }
          while (grew); for (p in mark) print p }'
}

# The PIDs given that still run: a zombie has exited, only its parent has yet to reap it.
running() {
  (($#)) || return 0
  ps -o pid=,stat= -p "$(IFS=,; echo "$*")" | awk '$2 !~ /^Z/ { print $1 }'
}

# TRIES INTERVAL_S PID...: polls until the PIDs have exited, at most TRIES times; prints those still running.
still_running_after() {
  local tries=$1 interval_s=$2 i alive
  shift 2
  for i in $(seq 1 "$tries"); do
    mapfile -t alive < <(running "$@")
    ((${#alive[@]})) || return 0
    sleep "$interval_s"
  done
  printf '%s\n' "${alive[@]}"
}

# SIGTERM, up to 5 s of grace (gcs_server ignores it while it has clients), then SIGKILL and until they are gone;
# only the PIDs given.
kill_pids() {
  local alive
  (($#)) || return 0
  kill -TERM "$@" 2>/dev/null || true
  mapfile -t alive < <(still_running_after 10 0.5 "$@")
  ((${#alive[@]})) || return 0
  kill -KILL "${alive[@]}" 2>/dev/null || true
  still_running_after 50 0.1 "${alive[@]}" > /dev/null
}

wait_http() {  # URL TIMEOUT_S EXPECTED_TEXT [TOKEN_FILE]: until it answers 200 with EXPECTED_TEXT in the body;
               # with WAIT_PID set, gives up as soon as that process has exited
  "$BIN/python" - "$@" <<'EOF'
import os, sys, time, urllib.error, urllib.request
url, timeout_s, expected = sys.argv[1], float(sys.argv[2]), sys.argv[3]
headers = {"Authorization": "Bearer " + open(sys.argv[4]).read().strip()} if len(sys.argv) > 4 else {}
deadline = time.monotonic() + timeout_s
while True:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as response:
            if response.status == 200 and expected in response.read().decode(errors="replace"):
                sys.exit(0)
    except (urllib.error.URLError, OSError):
        pass
    if os.environ.get("WAIT_PID") and not os.path.exists(f"/proc/{os.environ['WAIT_PID']}"):
        sys.exit(f"local.sh: the process that should answer {url} has exited")
    if time.monotonic() > deadline:
        sys.exit(f"local.sh: {url} did not answer within {timeout_s:.0f} s")
    time.sleep(0.5)
EOF
}

start_ray() {
  [[ -z "$(ray_pids)" ]] || die "a Ray head of $STATE is running; stop it first"
  make_state
  local gcs_port="${RAY_GCS_PORT:-6379}" dashboard_port="${RAY_DASHBOARD_PORT:-8265}"
  local temp_dir="${RAY_TEMP_DIR:-/tmp/vit-ray-$(id -u)-$gcs_port}" auth="${RAY_AUTH:-token}"
  local cpus="${RAY_NUM_CPUS:-$((2 * $(nproc)))}" token_file="$STATE/auth_token"
  [[ "$auth" == token || "$auth" == disabled ]] || die "RAY_AUTH must be 'token' or 'disabled', not '$auth'"
  if [[ "$auth" == token ]]; then
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
      (umask 077 && printf '%s\n' "$RAY_AUTH_TOKEN" > "$token_file")
    elif [[ ! -s "$token_file" ]]; then
      (umask 077 && "$BIN/python" -c 'import secrets; print(secrets.token_hex(32))' > "$token_file")
    fi
  fi
  mkdir -p "$temp_dir"
  cat > "$STATE/ray.env" <<EOF
RAY_GCS_PORT=$gcs_port
RAY_DASHBOARD_PORT=$dashboard_port
RAY_TEMP_DIR=$temp_dir
RAY_AUTH=$auth
EOF
  rm -f "$STATE/ray.pid"
  local args=(start --head --port="$gcs_port" --node-ip-address=127.0.0.1 --temp-dir="$temp_dir"
              --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port"
              --ray-client-server-port="${RAY_CLIENT_PORT:-10001}"
              --dashboard-agent-listen-port="${RAY_AGENT_PORT:-52365}" --disable-usage-stats)
  # the job's `python` is this project's interpreter; an inherited RAY_ADDRESS would make the head a worker
  local env=(env -u RAY_ADDRESS -u RAY_AUTH_TOKEN "PATH=$BIN:$PATH" "RAY_AUTH_MODE=$auth")
  [[ "$auth" == token ]] && env+=("RAY_AUTH_TOKEN_PATH=$token_file")
  if [[ -n "${RAY_AUTOSCALING_CONFIG:-}" ]]; then
    [[ -f "$RAY_AUTOSCALING_CONFIG" ]] || die "RAY_AUTOSCALING_CONFIG: no file $RAY_AUTOSCALING_CONFIG"
    sed "s|\${RAY_GCS_ADDRESS}|127.0.0.1:$gcs_port|g" "$RAY_AUTOSCALING_CONFIG" > "$STATE/autoscaling.yaml"
    # the fake multi-node provider needs the head in the foreground (--block): it runs in the background here.
    # Its nodes share this machine, where Ray's address discovery finds the one GCS under two addresses; Ray
    # Train's PlacementGroupCleaner then fails on "multiple active Ray instances" unless told the API server.
    "${env[@]}" RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1 \
      RAY_API_SERVER_ADDRESS="http://127.0.0.1:$dashboard_port" \
      nohup "$BIN/ray" "${args[@]}" --num-cpus=0 --autoscaling-config="$STATE/autoscaling.yaml" --block \
      > "$STATE/logs/ray-start.log" 2>&1 < /dev/null &
    echo $! > "$STATE/ray.pid"
  else
    "${env[@]}" "$BIN/ray" "${args[@]}" --num-cpus="$cpus" > "$STATE/logs/ray-start.log" 2>&1 < /dev/null \
      || { tail -n 20 "$STATE/logs/ray-start.log" >&2; stop_ray; die "ray start failed (log: $STATE/logs/ray-start.log)"; }
  fi
  local token_arg=()
  [[ "$auth" == token ]] && token_arg=("$token_file")
  # the job API answers before the head's raylet has registered: wait for the node itself
  wait_http "http://127.0.0.1:$dashboard_port/api/v0/nodes?limit=10" 180 '"state": "ALIVE"' "${token_arg[@]}" \
    || { tail -n 20 "$STATE/logs/ray-start.log" >&2; stop_ray; die "the Ray head did not come up"; }
  ray_pids | sort -n > "$STATE/ray.pids"
  echo "Ray head: dashboard http://127.0.0.1:$dashboard_port, GCS 127.0.0.1:$gcs_port, auth $auth," \
       "$(wc -l < "$STATE/ray.pids") processes (pids in $STATE/ray.pids)"
}

stop_ray() {
  local pids
  mapfile -t pids < <(ray_pids)
  kill_pids "${pids[@]}"
  rm -f "$STATE/ray.pid" "$STATE/ray.pids"
  echo "Ray head: stopped ${#pids[@]} processes"
}

start_mlflow() {
  [[ -z "$(mlflow_pids)" ]] || die "the MLflow server of $STATE is running; stop it first"
  make_state
  local port="${MLFLOW_PORT:-5000}"
  echo "MLFLOW_PORT=$port" > "$STATE/mlflow.env"
  mkdir -p "$STATE/mlartifacts"
  # the server's job runner (GenAI scorers) is seven more processes that tracking does not need
  env -u MLFLOW_TRACKING_URI MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
    nohup "$BIN/mlflow" server --backend-store-uri "sqlite:///$STATE/mlflow.db" \
    --artifacts-destination "$STATE/mlartifacts" --host 127.0.0.1 --port "$port" --workers "${MLFLOW_WORKERS:-1}" \
    >> "$STATE/logs/mlflow.log" 2>&1 < /dev/null &
  echo $! > "$STATE/mlflow.pid"
  WAIT_PID="$(cat "$STATE/mlflow.pid")" wait_http "http://127.0.0.1:$port/health" 120 OK \
    || { tail -n 20 "$STATE/logs/mlflow.log" >&2; stop_mlflow; die "the MLflow server did not come up"; }
  echo "MLflow server: http://127.0.0.1:$port, database $STATE/mlflow.db, artifacts $STATE/mlartifacts"
}

stop_mlflow() {
  local pids
  mapfile -t pids < <(mlflow_pids)
  kill_pids "${pids[@]}"
  rm -f "$STATE/mlflow.pid"
  echo "MLflow server: stopped ${#pids[@]} processes"
}

print_env() {
  # shellcheck disable=SC1091
  [[ -f "$STATE/ray.env" ]] && source "$STATE/ray.env"
  if [[ -n "${RAY_DASHBOARD_PORT:-}" ]]; then
    echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$RAY_DASHBOARD_PORT"
    echo "export RAY_AUTH_MODE=$RAY_AUTH"
    [[ "$RAY_AUTH" == token ]] && echo "export RAY_AUTH_TOKEN_PATH=$STATE/auth_token"
  fi
  # shellcheck disable=SC1091
  [[ -f "$STATE/mlflow.env" ]] && source "$STATE/mlflow.env" && echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
  return 0
}

status() {
  local ray mlflow
  ray="$(ray_pids | tr '\n' ' ')"
  mlflow="$(mlflow_pids | tr '\n' ' ')"
  echo "Ray head:      $([[ -n "$ray" ]] && echo "running, pids $ray" || echo stopped)"
  echo "MLflow server: $([[ -n "$mlflow" ]] && echo "running, pids $mlflow" || echo stopped)"
  print_env
  [[ -n "$ray" || -n "$mlflow" ]]
}

# The head and the MLflow server start (about 10 s each) and stop side by side.
start_both() {
  make_state
  local out="$STATE/logs/start-mlflow.out" mlflow_job
  ( start_mlflow ) > "$out" 2>&1 &
  mlflow_job=$!
  # shellcheck disable=SC2064
  trap "wait $mlflow_job; stop_mlflow > /dev/null" EXIT  # a head that fails to start leaves no server behind
  start_ray
  trap - EXIT
  wait "$mlflow_job" || { cat "$out" >&2; stop_ray > /dev/null; exit 1; }
  cat "$out"
}

case "${1:-}" in
  start) start_both; print_env ;;
  stop) stop_mlflow & stop_ray; wait ;;
  status) status ;;
  env) print_env ;;
  start-ray) start_ray ;;
  stop-ray) stop_ray ;;
  start-mlflow) start_mlflow ;;
  stop-mlflow) stop_mlflow ;;
  *) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2 ;;
esac
