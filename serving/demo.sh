#!/usr/bin/env bash
# Start the API on loopback, wait until the model is loaded, send one curl prediction,
# print the JSON, stop the server. Used by `make demo`; safe to run by hand:
#   bash serving/demo.sh RUN_DIR/model path/to/photo.jpg "Sunset at the beach! #travel"
set -euo pipefail
MODEL_DIR=${1:?usage: demo.sh MODEL_DIR IMAGE CAPTION [PORT]}
IMAGE=${2:?image path}
CAPTION=${3:?caption}
PORT=${4:-8000}
PY=${PY:-python}
HOST=127.0.0.1

MODEL_DIR="$MODEL_DIR" "$PY" -m uvicorn serving.app:app --host "$HOST" --port "$PORT" --log-level warning &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null || true' EXIT

# /ready turns 200 once the lifespan has loaded the model (up to ~60 s on a slow disk).
for _ in $(seq 1 120); do
  if curl -sf "http://$HOST:$PORT/ready" >/dev/null; then break; fi
  if ! kill -0 "$SERVER" 2>/dev/null; then echo "server exited during startup" >&2; exit 1; fi
  sleep 0.5
done
curl -sf "http://$HOST:$PORT/ready" >/dev/null || { echo "server not ready after 60 s" >&2; exit 1; }

echo "\$ curl -F image=@$IMAGE -F 'text=$CAPTION' $HOST:$PORT/predict"
curl -sS --fail-with-body -F "image=@$IMAGE" -F "text=$CAPTION" "http://$HOST:$PORT/predict"
echo
