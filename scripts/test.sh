#!/usr/bin/env bash
# The test suite: set up .venv, then run pytest (extra arguments go to pytest).
source "$(dirname "$0")/_env.sh"
exec "$PY" -m pytest -q "$@"
