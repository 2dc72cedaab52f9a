#!/usr/bin/env bash
# What the tests need beyond Python packages, installed when missing (as root, with apt):
# PostgreSQL for the tracking-server test (tests/test_team.py). Not root: the tests that need a
# missing tool skip and say why.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ "$(id -u)" = 0 ]; then
  "$here/postgres.sh" install
fi
