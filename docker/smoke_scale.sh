#!/usr/bin/env bash
# Smoke test of the scaled stack (docker/compose.scale.yaml), on loopback only: Redis with its
# append-only file, three replicas, nginx, Prometheus. Builds the images (from Debian's packages where
# no registry is reachable), brings the stack up, then through nginx: 50 session calls spread over the
# replicas continue one another exactly; a replica killed mid-run fails only its in-flight calls, each
# with an end (docker/scale_check.py). Prometheus must see all three replicas. Cleans up on any exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
IMAGE=charlstm:smoke-scale
PROJECT=charlstm-scale
COMPOSE=(docker-compose -p "$PROJECT" -f docker/compose.scale.yaml)
log() { printf '[smoke-scale] %s\n' "$*" >&2; }

need=()
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v curl >/dev/null || need+=(curl)
if ((${#need[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [[ -z ${DOCKER_HOST:-} ]]; then eval "$(../shared/tools/docker-up.sh)"; fi

export CHARLSTM_SESSION_CREATE_BURST=1000000  # the load below comes from one address
random_hex() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
SECRETS=$(mktemp -d)
random_hex > "$SECRETS/api_key"
chmod 755 "$SECRETS" && chmod 644 "$SECRETS/api_key"  # Prometheus's user in its container reads it; the folder is this run's
export CHARLSTM_IMAGE=$IMAGE REDIS_IMAGE=charlstm-redis:smoke-scale NGINX_IMAGE=charlstm-nginx:smoke-scale \
       PROMETHEUS_IMAGE=charlstm-prometheus:smoke-scale CHARLSTM_SESSION_KEY=$(random_hex) REDIS_PASSWORD=$(random_hex) \
       CHARLSTM_API_KEY=$(cat "$SECRETS/api_key") CHARLSTM_API_KEY_FILE=$SECRETS/api_key
cleanup() {
  if [[ ${KEEP_STACK:-0} != 1 ]]; then "${COMPOSE[@]}" down -v >/dev/null 2>&1 || true; fi
  rm -rf "$SECRETS"
}
trap cleanup EXIT

index_arg=()
if compgen -G "/opt/wheels/torch-2.13.0*.whl" >/dev/null; then
  cp -u /opt/wheels/torch-2.13.0*.whl .docker-wheels/
  index_arg=(--build-arg TORCH_INDEX_URL=)
fi
t0=$(date +%s)
docker build --network host -q -t "$IMAGE" "${index_arg[@]}" . >/dev/null  # the layer cache makes a rebuild cheap
for name in redis nginx prometheus; do
  docker image inspect "charlstm-$name:smoke-scale" >/dev/null 2>&1 && [[ ${REBUILD:-0} != 1 ]] \
    || docker build --network host -q -t "charlstm-$name:smoke-scale" -f "docker/$name.Dockerfile" docker >/dev/null
done
log "images ready in $(( $(date +%s) - t0 )) s"

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$(( $(date +%s) + $1 )) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if (( $(date +%s) > deadline )); then log "timed out waiting for $what"; "${COMPOSE[@]}" logs --tail 30 >&2; return 1; fi
    sleep 1
  done
}
"${COMPOSE[@]}" up -d --no-build >/dev/null
for port in 18101 18102 18103; do
  wait_for 120 "replica on $port" curl -fsS "http://127.0.0.1:$port/ready"
done
wait_for 30 "nginx" curl -fsS http://127.0.0.1:18100/ready
curl -fsS http://127.0.0.1:18100/ready | "$PYTHON" -c '
import json, sys
store = json.load(sys.stdin)["session_store"]
assert store["kind"] == "redis" and store["available"], store
print("[smoke-scale] /ready through nginx: session store", store, file=sys.stderr)'

targets_up() { curl -fsS http://127.0.0.1:18190/api/v1/targets | "$PYTHON" -c '
import json, sys
t = json.load(sys.stdin)["data"]["activeTargets"]
sys.exit(0 if sum(x["labels"].get("job") == "charlstm" and x["health"] == "up" for x in t) == 3 else 1)'; }
wait_for 90 "Prometheus to see the three replicas up" targets_up
log "Prometheus scrapes all three replicas"

"$PYTHON" docker/scale_check.py --nginx http://127.0.0.1:18100 \
  --replica http://127.0.0.1:18101 --replica http://127.0.0.1:18102 --replica http://127.0.0.1:18103 \
  --kill "${COMPOSE[*]} kill charlstm-3"

anonymous=$(docker exec "${PROJECT}_redis_1" redis-cli -p 18379 dbsize 2>&1 || true)
[[ $anonymous == *NOAUTH* ]] || { log "Redis answered a client without its password: $anonymous"; exit 1; }
redis_keys=$(docker exec -e REDISCLI_AUTH="$REDIS_PASSWORD" "${PROJECT}_redis_1" redis-cli -p 18379 dbsize)
log "Redis holds $redis_keys keys and refuses clients without the password; ok"
