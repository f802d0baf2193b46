#!/usr/bin/env bash
# Installs every Debian package intrain needs (ocl-icd-opencl-dev: Debian's
# dnnl CMake config looks for OpenCL, because oneDNN is built with its GPU runtime). Idempotent: installs only what is
# missing. Works as root or through sudo. Non-interactive.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  libeigen3-dev libdnnl-dev ocl-icd-opencl-dev opencl-c-headers libboost-dev libomp-dev
  libgtest-dev libgmock-dev libbenchmark-dev libcli11-dev nlohmann-json3-dev
  libopenmpi-dev openmpi-bin
  bible-kjv
  python3-matplotlib
)
# Optional peers used only by tests and benchmarks (never by the library):
# pass --with-peer to install PyTorch and OpenBLAS for the float peer.
if [[ "${1:-}" == "--with-peer" ]]; then
  packages+=(python3-torch libopenblas0-pthread)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "setup: all ${#packages[@]} packages already installed"
  exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "setup: need root or sudo to install: ${missing[*]}" >&2; exit 1
  fi
fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
