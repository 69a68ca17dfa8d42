#!/usr/bin/env bash
# Debian packages of the real-browser test (tests/browser): headless Chromium and its matching chromedriver.
# Installs only what is missing; run as root or with sudo available. The Python side (jupyterlab, selenium)
# comes from pyproject's dev extra.
set -euo pipefail

packages=(chromium chromium-driver)
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
  echo "install_browser_deps: need root (or sudo) to apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "install_browser_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
