#!/usr/bin/env bash
# Installs the Debian data packages the image experiments use. Needs root (or sudo) and apt; where they are
# missing, the loaders raise an error naming the package and the tests that need them skip.
set -u
# Spambase: kernlab's `spam` table from the Debian package r-cran-kernlab, extracted without installing R
# (read by metareweight.data.tabular.load_spambase; DATASETS.md §2.9).
KERNLAB="${METAREWEIGHT_CACHE:-$HOME/.cache/metareweight}/kernlab"
if [ ! -f "$KERNLAB/usr/lib/R/site-library/kernlab/data/spam.rda" ] && command -v apt-get >/dev/null; then
  mkdir -p "$KERNLAB" && (cd "$KERNLAB" && { apt-get download -qq r-cran-kernlab >/dev/null 2>&1 || { [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 && apt-get download -qq r-cran-kernlab >/dev/null 2>&1; }; } && dpkg-deb -x r-cran-kernlab_*.deb . && rm -f r-cran-kernlab_*.deb) || echo "install_data: r-cran-kernlab (Spambase) not extracted"
fi
FMNIST=/usr/share/datasets/fashion-mnist
if [ -d "$FMNIST" ]; then exit 0; fi
SUDO=""
if [ "$(id -u)" != 0 ]; then command -v sudo >/dev/null && SUDO="sudo -n" || { echo "install_data: not root; skipping"; exit 0; }; fi
command -v apt-get >/dev/null || { echo "install_data: no apt-get; skipping"; exit 0; }
$SUDO apt-get update -qq >/dev/null 2>&1 || true
$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || echo "install_data: dataset-fashion-mnist not installed"
