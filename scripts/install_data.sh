#!/usr/bin/env bash
# Installs the offline Fashion-MNIST files (Debian package dataset-fashion-mnist) once.
# Idempotent: does nothing when the files are already there.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ] && [ -f "$dir/t10k-labels-idx1-ubyte.gz" ]; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "need root (or sudo) to apt-get install dataset-fashion-mnist" >&2; exit 1; }
  sudo=sudo
fi
echo "installing Debian package dataset-fashion-mnist (30 MB) ..."
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
test -f "$dir/train-images-idx3-ubyte.gz"
