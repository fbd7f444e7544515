#!/usr/bin/env bash
# Install what is missing, start a local Ray head (unless RAY_ADDRESS is set), create the database and
# serve the dashboard on http://127.0.0.1:8501. Ctrl-C stops what this script started.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
export PEFTLAB_HOME=${PEFTLAB_HOME:-$PWD/.peftlab}
PORT=${PEFTLAB_PORT:-8501}

started_ray=0
if [ -z "${RAY_ADDRESS:-}" ]; then
  if ! python -m jobs.cluster status >/dev/null 2>&1; then started_ray=1; fi
  echo "Ray (local head, token auth): $(python -m jobs.cluster start)"
else
  echo "Ray: $RAY_ADDRESS"
fi
python -c "from db import store; store.get_engine(); print('database ready')"

cleanup() {
  if [ "$started_ray" = 1 ] && [ "${PEFTLAB_KEEP_RAY:-0}" != 1 ]; then python -m jobs.cluster stop; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
echo "PEFT Lab: http://127.0.0.1:$PORT"
python -m streamlit run app/main.py --server.address 127.0.0.1 --server.port "$PORT" \
  --server.headless true --browser.gatherUsageStats false
