#!/usr/bin/env bash
# Install what is missing (virtualenv, requirements, Debian's chromium for the browser test) and run the tests.
# Arguments go to pytest, e.g. ./run_tests.sh -k lora -x
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup_env.sh
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the browser test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will be skipped"
fi
export PATH="$PWD/.venv/bin:$PATH"
exec python -m pytest "$@"
