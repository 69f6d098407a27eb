#!/usr/bin/env bash
# Start the API on loopback (serving/launch.py), wait until the model is loaded, send one
# curl prediction, print the JSON, stop the server. Used by `make demo`; safe to run by hand:
#   bash serving/demo.sh RUN_DIR/model path/to/photo.jpg "Sunset at the beach! #travel" 8000 \
#       followers=12000 platform=instagram posted_at=2025-03-05T23:30:00+0000
# Arguments after the port are the model's feature fields, sent as -F NAME=VALUE.
set -euo pipefail
MODEL_DIR=${1:?usage: demo.sh MODEL_DIR IMAGE CAPTION [PORT [NAME=VALUE ...]]}
IMAGE=${2:?image path}
CAPTION=${3:?caption}
PORT=${4:-8000}
shift $(( $# < 4 ? $# : 4 ))
PY=${PY:-python}
FIELDS=()
for f in "$@"; do FIELDS+=(-F "$f"); done

echo "\$ curl -F image=@$IMAGE -F 'text=$CAPTION' ${FIELDS[*]} 127.0.0.1:$PORT/predict"
"$PY" -m serving.launch --model-dir "$MODEL_DIR" --port "$PORT" -- \
  curl -sS --fail-with-body -F "image=@$IMAGE" -F "text=$CAPTION" "${FIELDS[@]}" "http://127.0.0.1:$PORT/predict"
echo
