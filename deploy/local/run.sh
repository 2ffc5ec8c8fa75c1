#!/usr/bin/env bash
# `make run`: Redis, the lua-redis-shim and Envoy with the Tollgate filter, in the foreground.
# State and logs go under .run/ (ignored by git). Ctrl-C stops all three.
#
# Ports: Envoy 127.0.0.1:10000 (admin 9901), shim 127.0.0.1:8181 (as envoy.yaml expects),
# Redis 127.0.0.1:$REDIS_PORT (default 16379, away from a system Redis on 6379).
set -euo pipefail
cd "$(dirname "$0")/../.."

export REDIS_PORT=${REDIS_PORT:-16379}
export SHIM_LISTEN=127.0.0.1:8181
run=.run
mkdir -p "$run/redis" "$run/shim"
pids=()

stop() {
  trap - INT TERM EXIT
  echo; echo "stopping (logs kept in $run/)"
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop INT TERM EXIT

wait_for() { # wait_for WHAT COMMAND...
  local what=$1; shift
  for _ in $(seq 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "$what did not come up; see $run/" >&2; exit 1
}

redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
  --dir "$run/redis" --logfile redis.log &
pids+=($!)
wait_for "redis" redis-cli -p "$REDIS_PORT" ping

lua-redis-shim/shim --prefix "$PWD/$run/shim" &
pids+=($!)
wait_for "the shim" curl -fsS "http://$SHIM_LISTEN/healthz"

envoy -c envoy.yaml --disable-hot-restart -l info --log-path "$run/envoy.log" &
pids+=($!)
wait_for "envoy" curl -fsS http://127.0.0.1:9901/ready

cat <<MSG
Tollgate is running:
  Envoy   http://127.0.0.1:10000   (admin http://127.0.0.1:9901, log $run/envoy.log)
  shim    http://$SHIM_LISTEN   (logs $run/shim/logs/)
  Redis   127.0.0.1:$REDIS_PORT
Try:  for i in \$(seq 7); do curl -s -o /dev/null -w '%{http_code}\n' -H 'x-api-key: demo' localhost:10000/v1/search; done
Ctrl-C stops everything.
MSG
wait -n "${pids[@]}"
