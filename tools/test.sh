#!/usr/bin/env bash
# The project's test command: sets up the Python tools the tests use (an independent Delta
# reader), builds the binaries the process tests spawn, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import deltalake, pyarrow" 2>/dev/null; then
  echo "installing Python deltalake + pyarrow into .venv"
  .venv/bin/pip install --quiet --disable-pip-version-check deltalake pyarrow
fi
export FRESHET_PYTHON="$PWD/.venv/bin/python"
cargo build --workspace --bins
cargo test --workspace
