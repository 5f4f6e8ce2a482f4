#!/usr/bin/env bash
# The main job: set up .venv, make small Llama-shaped checkpoints, start the server, drive it with the client.
source "$(dirname "$0")/_env.sh"
exec "$PY" scripts/demo.py "$@"
