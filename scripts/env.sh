# Sourced by quickstart.sh and test.sh: create (or reuse) the repo's virtual environment and
# install the package into it. Usage: INSTALL_EXTRA=test; source scripts/env.sh
# (INSTALL_EXTRA: the optional dependencies to add, e.g. "test" or "test,bench"; empty: none)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UL2_VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "ul2 needs Python 3.11; $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=/path/to/python3.11." >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
EXTRA="${INSTALL_EXTRA:-}"
SPEC="$REPO"
[ -n "$EXTRA" ] && SPEC="$REPO[$EXTRA]"
# UL2_SKIP_INSTALL=1: use the environment as it is (the tests run smoke.sh that way).
if [ "${UL2_SKIP_INSTALL:-0}" != 1 ]; then
  echo "== installing $SPEC (pinned versions from pyproject.toml)"
  # pip's and setuptools' notices are kept in a log and shown only when the install fails.
  LOG="$VENV/install.log"
  if ! { python -m pip install --quiet --disable-pip-version-check --upgrade pip \
         && python -m pip install --quiet --disable-pip-version-check -e "$SPEC"; } >"$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "== installing $SPEC failed (log: $LOG)" >&2
    exit 1
  fi
fi
cd "$REPO"
