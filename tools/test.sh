#!/usr/bin/env bash
# The project's test command: sets up the Python tools the tests use (an independent Delta
# reader; the Helm engine and Kubernetes schemas for the chart tests), checks etcd is
# installed (cluster tests start their own), builds the binaries the process tests spawn,
# and runs every test: the Rust workspace, then the Helm chart's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import deltalake, pyarrow, adbc_driver_flightsql, duckdb, duckdb_ext, polars" 2>/dev/null; then
  echo "installing Python deltalake + pyarrow + adbc-driver-flightsql into .venv"
  # DuckDB's delta extension from the duckdb-ext-delta wheel (loads offline), pinned with
  # the duckdb it is built for.
  .venv/bin/pip install --quiet --disable-pip-version-check deltalake pyarrow adbc-driver-flightsql \
    duckdb==1.4.4 duckdb-ext-delta polars
fi
if [ ! -x .venv/bin/moto_server ]; then
  echo "installing moto[server] (the S3-compatible server of the S3 tests) into .venv"
  .venv/bin/pip install --quiet --disable-pip-version-check "moto[server]"
fi
if ! .venv/bin/python -c "import pytest, yaml, helm_python, kubernetes_validate" 2>/dev/null; then
  echo "installing pytest, pyyaml, helm-python-sdk, kubernetes-validate into .venv"
  .venv/bin/pip install --quiet --disable-pip-version-check pytest pyyaml helm-python-sdk kubernetes-validate cryptography
fi
if ! command -v etcd >/dev/null; then
  echo "etcd is missing: install Debian's etcd-server (.ci/run does)" >&2
  exit 1
fi
export FRESHET_PYTHON="$PWD/.venv/bin/python"
export FRESHET_BOOT_REQUIRED=1
cargo build --workspace --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
helm/tests/run.sh "$PWD/.venv" 2>&1 | tee -a "$log" || status=$?
# The benchmark harness on tiny tables (all contenders must agree), so it cannot rot.
# (The binary from the workspace build: `cargo run -p` alone would resolve other features
# and rebuild datafusion.)
if "${CARGO_TARGET_DIR:-target}/debug/freshet-bench" smoke 2>&1 | tee -a "$log"; then
  echo "bench smoke: 1 passed" | tee -a "$log"
else
  echo "bench smoke: 1 failed" | tee -a "$log"
  status=1
fi
df -h . | tail -1 | awk '{print "disk after the tests: " $4 " free"}'
echo "target/: $(du -sh "${CARGO_TARGET_DIR:-target}" 2>/dev/null | cut -f1)"
passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
echo "tests: $passed passed, $failed failed"
exit $status
