#!/usr/bin/env bash
# The Helm chart's tests: render helm/freshet offline with the real Helm engine (Helm v4
# SDK from the helm-python-sdk package), lint it, validate every manifest against the
# Kubernetes schemas (kubernetes-validate), check labels, scaling, security and config,
# and boot the binaries on the rendered freshet.toml (skipped until target/debug/freshet
# has `coordinator` and `worker`; FRESHET_BOOT_REQUIRED=1 makes that a failure).
#
#   helm/tests/run.sh [VENV] [pytest args...]     (VENV default: <repo>/.venv)
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${1:-$repo/.venv}"
shift || true
cd "$repo"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import pytest, yaml, helm_python, kubernetes_validate, jsonschema, cryptography" 2>/dev/null; then
  echo "installing pytest, pyyaml, helm-python-sdk, kubernetes-validate, cryptography into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check pytest pyyaml helm-python-sdk kubernetes-validate cryptography
fi
exec "$venv/bin/python" -m pytest helm/tests -q -p no:cacheprovider "$@"
