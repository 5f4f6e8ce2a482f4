#!/usr/bin/env bash
# Static checks: ruff over the tree, mypy (strict) over the two packages. Run by scripts/test.sh.
source "$(dirname "$0")/_env.sh"
"$PY" -m ruff check .
# mypy cannot follow the editable install's import hook, and the package `kinship_service` lives in
# the folder `service/`: give it a search path of two links named like the packages.
LINKS="$ROOT/build/mypy-path"
mkdir -p "$LINKS"
ln -sfn "$ROOT/service" "$LINKS/kinship_service"
ln -sfn "$ROOT/client/kinship_client" "$LINKS/kinship_client"
MYPYPATH="$LINKS" "$PY" -m mypy -p kinship_service -p kinship_client
