#!/usr/bin/env bash
# Installs the Debian data packages the image experiments use. Needs root (or sudo) and apt; where they are
# missing, the loaders raise an error naming the package and the tests that need them skip.
set -u
FMNIST=/usr/share/datasets/fashion-mnist
if [ -d "$FMNIST" ]; then exit 0; fi
SUDO=""
if [ "$(id -u)" != 0 ]; then command -v sudo >/dev/null && SUDO="sudo -n" || { echo "install_data: not root; skipping"; exit 0; }; fi
command -v apt-get >/dev/null || { echo "install_data: no apt-get; skipping"; exit 0; }
$SUDO apt-get update -qq >/dev/null 2>&1 || true
$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || echo "install_data: dataset-fashion-mnist not installed"
