#!/usr/bin/env bash
# Set up cowtree on a fresh machine: a venv in .venv with cowtree installed
# editable (this builds the native helpers with gcc).  Idempotent and quiet:
# reinstalls only when the packaging or the native sources changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if ! command -v gcc >/dev/null; then
    echo "cowtree setup: installing gcc (needed for the native helpers)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
STAMP=.venv/.cowtree-installed
WANT="$(find pyproject.toml setup.py native -type f ! -name '*.o' ! -name '*.bin' -print0 | sort -z | xargs -0 cat | sha256sum | cut -d' ' -f1)"
# -I: the check must not import stages from the current directory (this one), only from the
# install, and that install must be this checkout's (a .venv copied from elsewhere is not)
installed() {
    .venv/bin/python -I -c 'import sys, stages._native as n; sys.exit(not n.__file__.startswith(sys.argv[1] + "/"))' "$ROOT" 2>/dev/null
}
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] || ! installed; then
    echo "cowtree setup: installing into .venv (pip install -e '.[test]')" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' >&2
    echo "$WANT" > "$STAMP"
fi
# bytecode for the package, also where PYTHONDONTWRITEBYTECODE is set: every cow-* command
# would otherwise compile its modules from source at each start (pip does this for wheels)
.venv/bin/python -m compileall -q stages >/dev/null
