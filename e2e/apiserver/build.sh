#!/usr/bin/env bash
# Builds a real kube-apiserver (v1.20.2, from Debian bookworm's `kubernetes` source package)
# offline, once, into ~/.cache/ferrovip. Also installs etcd and kubectl from Debian.
# Prints the path of the binary on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

cache="${FERROVIP_CACHE:-$HOME/.cache/ferrovip}"
# The suffix names our patch level: bump it whenever the patches in e2e/kube-source.sh change,
# so a cached binary built without them is never used.
bin="$cache/kube-apiserver-v1.20.2-ferrovip1"
mkdir -p "$cache"

export DEBIAN_FRONTEND=noninteractive
pkgs=(etcd-server)
# Any kubectl will do (the machine image may already carry a newer one).
command -v kubectl >/dev/null || pkgs+=(kubernetes-client)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi

work="$cache/build"
src=$(bash "$here/../kube-source.sh" "$work")
echo "building kube-apiserver (several minutes)" >&2
bash "$here/../kube-make.sh" "$src" cmd/kube-apiserver
built=$(find "$src/_output" -type f -name kube-apiserver -perm -u+x | head -n 1)
[ -n "$built" ] || { echo "kube-apiserver binary not found after make" >&2; exit 1; }
install -m 0755 "$built" "$bin.tmp"
mv "$bin.tmp" "$bin"
cd "$cache"
rm -rf "$work"
echo "$bin"
