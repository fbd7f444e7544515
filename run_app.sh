#!/usr/bin/env bash
# Install what is missing, start a local Ray head (unless RAY_ADDRESS is set), create the database and
# serve the dashboard on http://127.0.0.1:8501. The Ray head outlives the dashboard: stopping, crashing or
# restarting Streamlit never stops a run. Stop the head on purpose with: python -m jobs.cluster stop
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
export PEFTLAB_HOME=${PEFTLAB_HOME:-$PWD/.peftlab}
PORT=${PEFTLAB_PORT:-8501}

if [ -z "${RAY_ADDRESS:-}" ]; then
  echo "Ray (local head, token auth, 127.0.0.1 only): $(python -m jobs.cluster start)"
else
  echo "Ray: $RAY_ADDRESS"
fi
python -c "from db import store; store.get_engine(); print('database ready')"

on_exit() {
  if [ -z "${RAY_ADDRESS:-}" ]; then
    echo "The dashboard stopped; the local Ray head keeps running ($(python -m jobs.cluster status 2>&1 | tail -1))."
    echo "Run ./run_app.sh again to reattach, or stop the head (cancelling its active runs) with:"
    echo "  PEFTLAB_HOME=$PEFTLAB_HOME .venv/bin/python -m jobs.cluster stop"
  fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM
echo "PEFT Lab: http://127.0.0.1:$PORT"
python -m streamlit run app/main.py --server.address 127.0.0.1 --server.port "$PORT" \
  --server.headless true --browser.gatherUsageStats false
