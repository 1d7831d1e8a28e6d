#!/usr/bin/env bash
# Installs the Debian packages given as arguments when they are missing.
# As root it runs apt-get; otherwise it prints the exact command and stops.
set -euo pipefail

export PATH="$PATH:$HOME/.cargo/bin"
if ! command -v cargo >/dev/null || ! command -v rustc >/dev/null; then
  echo "fedagg needs Rust (cargo and rustc): install it from https://rustup.rs, then retry." >&2
  exit 1
fi

missing=()
for pkg in "$@"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

cmd="apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "fedagg needs these Debian packages: ${missing[*]}" >&2
  echo "Run as root:  apt-get update && $cmd" >&2
  exit 1
fi
echo "Installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
$cmd -qq
