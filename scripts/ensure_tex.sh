#!/usr/bin/env bash
# Make sure latexmk and the TeX Live packages the paper needs are installed (Debian/Ubuntu apt-get).
set -euo pipefail
need() { command -v latexmk >/dev/null 2>&1 && kpsewhich booktabs.sty siunitx.sty tikz.sty >/dev/null 2>&1; }
need && exit 0
pkgs="latexmk texlive-latex-base texlive-latex-recommended texlive-fonts-recommended texlive-science texlive-pictures"
if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else SUDO=none; fi
  if [ "$SUDO" != none ]; then
    echo "Installing TeX Live with apt-get: $pkgs"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
    need && exit 0
  fi
fi
echo "ERROR: latexmk / TeX Live not found and could not be installed automatically." >&2
echo "Install them yourself, e.g. on Debian/Ubuntu: sudo apt-get install $pkgs" >&2
echo "(on macOS: MacTeX; elsewhere: TeX Live with latexmk, booktabs, siunitx, pgf/TikZ)." >&2
exit 1
