#!/usr/bin/env bash
# Headless Chromium for the dashboard's browser tests: Debian's package (about 40 s to install),
# never a browser build downloaded by a test tool. Does nothing when chromium is already there;
# where it cannot be installed, says so and lets the tests skip (they fail instead under CI=true).
set -uo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing chromium from Debian's packages for the browser tests" >&2
  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends chromium >/dev/null; then
    exit 0
  fi
  echo "[setup] warning: installing chromium failed" >&2
else
  echo "[setup] warning: no chromium, and apt-get as root is not available to install it" >&2
fi
exit 0
