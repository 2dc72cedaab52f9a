#!/usr/bin/env bash
# A private PostgreSQL cluster for MLflow's tracking server (docs/team.md).
#
#   scripts/postgres.sh install          install Debian's postgresql when missing (root only)
#   scripts/postgres.sh start DIR PORT   create the cluster in DIR on first start (database, user
#                                        and password "mlflow"), start it on 127.0.0.1:PORT and
#                                        print its URI
#   scripts/postgres.sh stop DIR         stop it
#
# As root the server runs as the `postgres` user (PostgreSQL refuses root); DIR is chowned to it.
set -euo pipefail

bindir() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1
}

install() {
  if [ -n "$(bindir)" ] && [ -x "$(bindir)/initdb" ]; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "postgres.sh: installing Debian's postgresql" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "postgres.sh: PostgreSQL is not installed: 'sudo apt-get install postgresql'" >&2
    exit 1
  fi
}

# Run a PostgreSQL program as the cluster's owner.
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
  local dir=$1 port=$2 bin
  install
  bin=$(bindir)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
  chmod 700 "$dir"
  if [ ! -f "$dir/PG_VERSION" ]; then
    # Trust on the cluster's own socket folder (DIR), a password over TCP.
    as_owner "$bin/initdb" -D "$dir" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
      >"$dir.initdb.log" 2>&1 || { cat "$dir.initdb.log" >&2; exit 1; }
  fi
  if ! as_owner "$bin/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    as_owner "$bin/pg_ctl" -D "$dir" -w -t 60 -l "$dir/server.log" \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1" start >/dev/null
  fi
  psql_() { as_owner "$bin/psql" -h "$dir" -p "$port" -U postgres -qtA "$@"; }
  if [ -z "$(psql_ -c "select 1 from pg_roles where rolname = 'mlflow'")" ]; then
    psql_ -c "create role mlflow login password 'mlflow'"
  fi
  if [ -z "$(psql_ -c "select 1 from pg_database where datname = 'mlflow'")" ]; then
    psql_ -c "create database mlflow owner mlflow"
  fi
  # psycopg2 named: SQLAlchemy 2.1 would pick psycopg (v3) for a bare postgresql://.
  echo "postgresql+psycopg2://mlflow:mlflow@127.0.0.1:$port/mlflow"
}

stop() {
  local dir=$1 bin
  bin=$(bindir)
  if [ -n "$bin" ] && [ -f "$dir/PG_VERSION" ]; then
    as_owner "$bin/pg_ctl" -D "$dir" -m immediate stop >/dev/null || true
  fi
}

case "${1:-}" in
  install) install ;;
  start) start "$2" "$3" ;;
  stop) stop "$2" ;;
  *) echo "usage: $0 install | start DIR PORT | stop DIR" >&2; exit 2 ;;
esac
