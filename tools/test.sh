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
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace 2>&1 | tee "$log" || status=$?
passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
echo "tests: $passed passed, $failed failed"
exit $status
