#!/usr/bin/env bash
# Set up .venv with datafabric and everything it needs, on a machine that has only
# Python 3.11+ and a C compiler.  Safe to run again: it only does what is missing.
#
# ndtypes 0.2.0b2 (the type system of the design) is old and pip cannot build it as
# published: its setup.py expects a library file that it then builds itself.  It builds
# on Python 3.11 to 3.13 once <site-packages>/ndtypes/libndtypes.so.0.2.0b2 exists
# (empty) and pip runs without build isolation, with setuptools and wheel present.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"datafabric needs Python 3.11 or newer; {sys.executable} is {sys.version.split()[0]}")
PY

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import ndtypes" 2>/dev/null; then
    pip_install --upgrade pip "setuptools>=64" wheel
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
    mkdir -p "$site/ndtypes"
    : > "$site/ndtypes/libndtypes.so.0.2.0b2"
    pip_install --no-build-isolation "ndtypes==0.2.0b2"
fi

pip_install -e ".[test]"

# The C reader (native/): dfcat and libdatafabric.so, with the C compiler the ndtypes build needs.
CC=${CC:-cc}
"$CC" -O2 -Wall -Wextra -std=c11 -o .venv/bin/dfcat native/dfcat.c native/datafabric.c -lrt
"$CC" -O2 -Wall -Wextra -std=c11 -fPIC -shared -o .venv/lib/libdatafabric.so native/datafabric.c -lrt
echo "datafabric is installed in .venv ($("$PY" --version))"
