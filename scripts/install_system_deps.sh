#!/usr/bin/env bash
# Debian packages the tests start for real: headless Chromium and its matching chromedriver (tests/browser), and
# the PostgreSQL server that two `cpwb tune` workers share a study through (tests/test_tune.py). Installs only
# what is missing; run as root or with sudo available. The Python side (jupyterlab, selenium)
# comes from pyproject's dev extra.
set -euo pipefail

packages=(chromium chromium-driver postgresql)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "install_system_deps: need root (or sudo) to apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "install_system_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
# policy-rc.d 101: the package's own service is not started (the tests start their servers themselves).
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ] && [ "$(id -u)" -eq 0 ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
fi
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
if [ "$made_policy" -eq 1 ]; then rm -f "$policy"; fi
