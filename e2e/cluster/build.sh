#!/usr/bin/env bash
# Builds kubelet, kube-controller-manager and kube-scheduler (v1.20.2, from Debian bookworm's
# `kubernetes` source package, with the same patches and Go recipe as e2e/apiserver/build.sh)
# offline, once, into ~/.cache/ferrovip/kube-node-v1.20.2-ferrovip1/. Also installs from Debian
# what the real-cluster rig (e2e/harness/src/cluster.rs) runs: containerd, runc, buildah, the CNI
# plugins and a static busybox, from which it builds the rig's pause image (`pause.tar` in the
# same directory, an OCI archive of localhost/ferrovip-pause:1: busybox `sleep`, the sandbox
# image every node's containerd names). Prints the directory on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${FERROVIP_CACHE:-$HOME/.cache/ferrovip}"
# The suffix names our patch level (shared with the API server's build): bump it whenever the
# patches in e2e/kube-source.sh change, so binaries built without them are never used.
dir="$cache/kube-node-v1.20.2-ferrovip1"
bins=(kubelet kube-controller-manager kube-scheduler)
mkdir -p "$cache"

export DEBIAN_FRONTEND=noninteractive
missing=()
for p in containerd runc buildah containernetworking-plugins busybox-static; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

complete() {
  local b
  for b in "${bins[@]}"; do [ -x "$dir/$b" ] || return 1; done
}
pause_image=localhost/ferrovip-pause:1
build_pause() {
  [ -s "$dir/pause.tar" ] && return 0
  echo "building the pause image $pause_image" >&2
  local tmp ctr
  tmp=$(mktemp -d)
  # Private storage, vfs (no mounts): nothing is left in the host's container storage.
  bah() { buildah --root "$tmp/root" --runroot "$tmp/runroot" --storage-driver vfs "$@"; }
  ctr=$(bah from -q scratch)
  bah copy -q "$ctr" /bin/busybox /bin/busybox >/dev/null
  # The sandbox only holds the pod's namespaces; containerd stops it with SIGKILL.
  bah config --entrypoint '["/bin/busybox","sleep","2147483647"]' "$ctr" >&2
  bah commit -q "$ctr" "$pause_image" >/dev/null
  bah push -q "$pause_image" "oci-archive:$dir/pause.tar.tmp:$pause_image" >&2
  bah rm "$ctr" >/dev/null
  rm -rf "$tmp"
  mv "$dir/pause.tar.tmp" "$dir/pause.tar"
}

if complete; then
  build_pause
  echo "$dir"
  exit 0
fi

work="$cache/build-kube-node"
src=$(bash "$here/kube-source.sh" "$work")
echo "building ${bins[*]} (about 10 minutes on 2 cores)" >&2
bash "$here/kube-make.sh" "$src" "cmd/kubelet cmd/kube-controller-manager cmd/kube-scheduler"
rm -rf "$dir.tmp"
mkdir -p "$dir.tmp"
for b in "${bins[@]}"; do
  built=$(find "$src/_output" -type f -name "$b" -perm -u+x | head -n 1)
  [ -n "$built" ] || { echo "$b binary not found after make" >&2; exit 1; }
  install -m 0755 "$built" "$dir.tmp/$b"
done
rm -rf "$dir"
mv "$dir.tmp" "$dir"
rm -rf "$work"
build_pause
echo "$dir"
