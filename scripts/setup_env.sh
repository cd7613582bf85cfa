#!/usr/bin/env bash
# Creates .venv (once) and installs visionbench with its dev extras; installs the system
# library open3d needs (libusb-1.0-0) when it is missing and we are root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing libusb-1.0-0 (needed by open3d) with apt-get" >&2
    (apt-get install -y -qq libusb-1.0-0 >/dev/null 2>&1 \
      || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libusb-1.0-0 >/dev/null)) \
      || { echo "error: could not install libusb-1.0-0 with apt-get; install it and retry" >&2; exit 2; }
  else
    echo "error: open3d needs the system package libusb-1.0-0: install it (e.g. 'sudo apt-get install libusb-1.0-0') and retry" >&2
    exit 2
  fi
fi

stamp=.venv/.visionbench-installed
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
