#!/usr/bin/env bash
# Podman, runc and debootstrap for tests/test_image.py, which builds the Dockerfile's images and
# runs them with no Docker engine and no registry (the base image is made with debootstrap).
# Debian's packages (about a minute to install); runc is named so apt does not pick crun, which
# fails on hosts with hybrid cgroups. Does nothing when all three are there; where they cannot
# be installed, says so and lets the tests skip (they fail instead under CI=true).
set -uo pipefail
PATH="$PATH:/usr/sbin:/sbin"  # debootstrap's home
missing=0
for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing=1
done
[ "$missing" = 0 ] && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing podman, runc and debootstrap from Debian's packages for the image tests" >&2
  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq podman runc debootstrap >/dev/null; then
    exit 0
  fi
  echo "[setup] warning: installing podman failed" >&2
else
  echo "[setup] warning: no podman, and apt-get as root is not available to install it" >&2
fi
exit 0
