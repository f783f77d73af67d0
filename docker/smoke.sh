#!/usr/bin/env bash
# Smoke test of the image and the compose stack, on loopback only. Run from anywhere; .ci/run calls it.
# Builds the image, runs it, waits for healthy, checks /ready, /generate (plain and streaming) and
# /metrics (promtool); then the compose stack: Prometheus sees the target up and can query a charlstm_
# series. Cleans up on any exit.
#
# Needs a running Docker engine (docker info must work), docker compose (v2 plugin or v1 docker-compose),
# curl, python3 and promtool (Debian's prometheus package). Only in CI (CI=true), where no engine runs,
# does it start one with the build machines' helper ../shared/tools/docker-up.sh, which a clone lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
IMAGE=charlstm:smoke
SLIM_IMAGE=charlstm:smoke-serve
PROM_IMAGE=charlstm-prometheus:smoke
NAME=charlstm-smoke-$$
PORT=${SMOKE_PORT:-18080}
CI_DOCKER_UP=../shared/tools/docker-up.sh
exec 3>&2  # the log, also from inside checks whose own output is silenced
log() { printf '[smoke] %s\n' "$*" >&3; }
fail() { log "$*"; exit 1; }
in_ci() { [[ ${CI:-} == true ]]; }

need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v curl >/dev/null || need+=(curl)
command -v docker >/dev/null || need+=(docker.io)
if ! docker compose version >/dev/null 2>&1; then command -v docker-compose >/dev/null || need+=(docker-compose); fi
if ((${#need[@]})); then
  in_ci || fail "missing: ${need[*]} (Debian/Ubuntu packages; e.g. sudo apt-get install ${need[*]})"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  if in_ci && [[ -x $CI_DOCKER_UP ]]; then
    log "no Docker engine is running; CI=true: starting one with $CI_DOCKER_UP"
    eval "$("$CI_DOCKER_UP")"
  else
    fail "no running Docker engine: 'docker info' fails. Start Docker (e.g. 'sudo systemctl start docker', or Docker Desktop), check that your user may use it, then run docker/smoke.sh again"
  fi
fi
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose -p charlstm-smoke -f docker/compose.yaml)
else
  COMPOSE=(docker-compose -p charlstm-smoke -f docker/compose.yaml)
fi

cleanup() {
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  CHARLSTM_IMAGE=$IMAGE PROMETHEUS_IMAGE=$PROM_IMAGE "${COMPOSE[@]}" down -v >/dev/null 2>&1 || true
}
trap cleanup EXIT

# The CPU torch wheel from this machine's disk when there is one (the build machines keep it in
# /opt/wheels); the PyTorch index otherwise.
index_arg=()
if compgen -G "/opt/wheels/torch-2.13.0*.whl" >/dev/null; then
  mkdir -p .docker-wheels && cp -u /opt/wheels/torch-2.13.0*.whl .docker-wheels/
  index_arg=(--build-arg TORCH_INDEX_URL=)
fi

log "building $IMAGE"
t0=$(date +%s)
docker build --network host -q -t "$IMAGE" "${index_arg[@]}" . >/dev/null
t1=$(date +%s)
size=$(docker image inspect "$IMAGE" --format '{{.Size}}')
log "built in $((t1 - t0)) s; image size $((size / 1000000)) MB"

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$(( $(date +%s) + $1 )) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if (( $(date +%s) > deadline )); then log "timed out waiting for $what"; return 1; fi
    sleep 1
  done
}
healthy() {
  local state
  state=$(docker inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$NAME")
  if [[ $state == exited* ]]; then log "the container exited"; docker logs "$NAME" 2>&1 | tail -20 >&3; exit 1; fi
  [[ $state == "running healthy" ]]
}

check_text() {  # Shakespeare-like: mostly letters and spaces, and common English words
  python3 - "$1" <<'PY'
import json, re, sys
text = sys.argv[1]
words = re.findall(r"[A-Za-z']+", text)
common = {"the", "and", "to", "of", "i", "my", "you", "a", "that", "in", "is", "not", "me", "it", "with", "be", "your", "his", "thou", "what"}
letters = sum(c.isalpha() or c.isspace() for c in text) / max(1, len(text))
hits = sum(w.lower() in common for w in words)
print(f"[smoke] text sample: {text[:120]!r} (letters+spaces {letters:.0%}, common words {hits})", file=sys.stderr)
sys.exit(0 if len(text) >= 200 and letters > 0.85 and hits >= 5 else 1)
PY
}

log "running $IMAGE on 127.0.0.1:$PORT"
docker run -d --name "$NAME" --network host -e CHARLSTM_HOST=127.0.0.1 -e CHARLSTM_PORT="$PORT" "$IMAGE" >/dev/null
wait_for 120 "a healthy container" healthy || { docker logs "$NAME" | tail -30; exit 1; }
[ "$(docker inspect -f '{{.Config.User}}' "$NAME")" = charlstm ] || { log "container does not run as charlstm"; exit 1; }
curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null
plain=$(curl -fsS "http://127.0.0.1:$PORT/generate" -H 'content-type: application/json' \
  -d '{"prompt": "ROMEO:\n", "max_new_tokens": 300, "temperature": 0.7, "seed": 1}')
check_text "$(python3 -c 'import json,sys; print(json.load(sys.stdin)["text"])' <<<"$plain")"
streamed=$(curl -fsSN "http://127.0.0.1:$PORT/generate" -H 'content-type: application/json' \
  -d '{"prompt": "ROMEO:\n", "max_new_tokens": 300, "temperature": 0.7, "seed": 1, "stream": true}')
python3 - "$plain" "$streamed" <<'PY'
import json, sys
plain, raw = json.loads(sys.argv[1]), sys.argv[2]
text, event, done = "", None, None
for line in raw.splitlines():
    line = line.rstrip("\r")
    if line.startswith("event:"):
        event = line.split(":", 1)[1].strip()
    elif line.startswith("data:"):
        data = json.loads(line.split(":", 1)[1])
        if event == "token":
            text += data["text"]
        elif event == "done":
            done = data
assert done and done["finish_reason"] == "length", done
assert text == plain["text"], "streamed text differs from the plain response for the same seed"
print("[smoke] streaming equals the plain response", file=sys.stderr)
PY
curl -fsS "http://127.0.0.1:$PORT/metrics" | promtool check metrics
backend=$(curl -fsS "http://127.0.0.1:$PORT/info" | python3 -c '
import json, sys
b = json.load(sys.stdin)["engine"]["backend"]
print(b["name"] if isinstance(b, dict) else b)')
log "image: ok (backend $backend)"
docker rm -f "$NAME" >/dev/null

# The serving image: no torch. On the backend the full image chose (where the serving install has it),
# the same seed must give the same text, bit for bit.
log "building $SLIM_IMAGE (the serving install, no torch)"
docker build --network host -q -t "$SLIM_IMAGE" --build-arg EXTRAS= . >/dev/null
slim_size=$(docker image inspect "$SLIM_IMAGE" --format '{{.Size}}')
log "serving image size $((slim_size / 1000000)) MB"
if docker run --rm "$SLIM_IMAGE" python3 -c 'import torch' >/dev/null 2>&1; then fail "the serving image has torch"; fi
slim_backend=auto
case $backend in onnx*) slim_backend=$backend ;; esac
docker run -d --name "$NAME" --network host -e CHARLSTM_HOST=127.0.0.1 -e CHARLSTM_PORT="$PORT" \
  -e CHARLSTM_BACKEND="$slim_backend" "$SLIM_IMAGE" >/dev/null
wait_for 120 "a healthy serving container" healthy || { docker logs "$NAME" | tail -30; exit 1; }
slim_plain=$(curl -fsS "http://127.0.0.1:$PORT/generate" -H 'content-type: application/json' \
  -d '{"prompt": "ROMEO:\n", "max_new_tokens": 300, "temperature": 0.7, "seed": 1}')
check_text "$(python3 -c 'import json,sys; print(json.load(sys.stdin)["text"])' <<<"$slim_plain")"
if [[ $slim_backend == "$backend" ]]; then
  python3 - "$plain" "$slim_plain" <<'PY'
import json, sys
assert json.loads(sys.argv[1])["text"] == json.loads(sys.argv[2])["text"], "the serving image writes another text for the same seed"
print("[smoke] the serving image writes the full image's text for the same seed", file=sys.stderr)
PY
else
  log "the full image chose $backend, which the serving image lacks: texts not compared"
fi
curl -fsS "http://127.0.0.1:$PORT/metrics" | promtool check metrics
log "serving image: ok"
docker rm -f "$NAME" >/dev/null

log "building $PROM_IMAGE (Prometheus from Debian's package)"
docker build --network host -q -t "$PROM_IMAGE" -f docker/prometheus.Dockerfile docker >/dev/null
log "starting the compose stack"
CHARLSTM_IMAGE=$IMAGE PROMETHEUS_IMAGE=$PROM_IMAGE "${COMPOSE[@]}" up -d --no-build >/dev/null
wait_for 120 "the service in compose" curl -fsS http://127.0.0.1:8000/ready
curl -fsS http://127.0.0.1:8000/generate -H 'content-type: application/json' -d '{"max_new_tokens": 20}' >/dev/null
target_up() { curl -fsS http://127.0.0.1:9090/api/v1/targets | python3 -c '
import json, sys
t = json.load(sys.stdin)["data"]["activeTargets"]
sys.exit(0 if any(x["labels"].get("job") == "charlstm" and x["health"] == "up" for x in t) else 1)'; }
series_present() { curl -fsS 'http://127.0.0.1:9090/api/v1/query' --data-urlencode 'query=charlstm_requests_total' | python3 -c '
import json, sys
r = json.load(sys.stdin)
sys.exit(0 if r["status"] == "success" and r["data"]["result"] else 1)'; }
wait_for 90 "Prometheus to see the target up" target_up
wait_for 60 "a charlstm_ series in Prometheus" series_present
log "compose: Prometheus scrapes the service; charlstm_requests_total is queryable"
sid=$(curl -fsS http://127.0.0.1:8000/sessions -H 'content-type: application/json' -d '{"prompt": "KING:"}' | python3 -c 'import json, sys; print(json.load(sys.stdin)["session_id"])')
curl -fsS "http://127.0.0.1:8000/sessions/$sid/generate" -H 'content-type: application/json' -d '{"max_new_tokens": 20, "stream": true}' >/dev/null
curl -fsS -X DELETE "http://127.0.0.1:8000/sessions/$sid" >/dev/null
python3 docker/check_dashboard.py http://127.0.0.1:9090 --wait 90
log "compose: every dashboard panel's query parses and returns a series"
log "ok: build $((t1 - t0)) s, image $((size / 1000000)) MB, serving image $((slim_size / 1000000)) MB"
