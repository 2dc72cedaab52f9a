#!/usr/bin/env bash
# What the tests need beyond Python packages, installed when missing (as root, with apt):
# PostgreSQL for the tracking-server test (tests/test_team.py), Chromium and its WebDriver for
# the browser test of the MLflow UI (tests/test_ui.py). Not root: the tests that need a
# missing tool skip and say why.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ "$(id -u)" = 0 ]; then
  "$here/postgres.sh" install
  if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    echo "ensure-test-services.sh: installing chromium and chromium-driver" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
fi
