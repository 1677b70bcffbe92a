#!/usr/bin/env bash
# Install everything the test suite needs on Debian 12 (as root) and run it.
# Usage: tests/run.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(runc crun catatonit containernetworking-plugins docker-registry skopeo umoci
          busybox-static iproute2 iptables util-linux python3-venv)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[test]"

exec .venv/bin/python -m pytest "$@"
