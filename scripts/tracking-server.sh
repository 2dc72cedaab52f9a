#!/usr/bin/env bash
# `make server`: MLflow's tracking server for a team, on PostgreSQL (docs/team.md).
# PostgreSQL (a private cluster, created on first start) holds runs and the model registry;
# artifacts (models, plots) go to a local folder the server serves to its clients.
# Settings (environment): SERVER_DIR (.mlflow-server), PG_PORT (5433), MLFLOW_HOST (127.0.0.1),
# MLFLOW_PORT (5000); extra `mlflow server` options after the script's name.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${SERVER_DIR:-.mlflow-server}
mkdir -p "$dir/artifacts"
dir=$(cd "$dir" && pwd)  # absolute: the server records artifact locations as given
uri=$("$here/postgres.sh" start "$dir/postgres" "${PG_PORT:-5433}")
echo "tracking server: runs in $uri, artifacts in $dir/artifacts;" \
  "clients: export MLFLOW_TRACKING_URI=http://${MLFLOW_HOST:-127.0.0.1}:${MLFLOW_PORT:-5000}" >&2
exec mlflow server --backend-store-uri "$uri" --artifacts-destination "$dir/artifacts" \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" "$@"
