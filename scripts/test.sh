#!/usr/bin/env bash
# The test suite: set up .venv, run the static checks (scripts/lint.sh), then pytest (extra arguments go to pytest).
source "$(dirname "$0")/_env.sh"
"$ROOT/scripts/lint.sh"
exec "$PY" -m pytest -q "$@"
