#!/usr/bin/env bash
# Shared by e2e/apiserver/build.sh and e2e/cluster/build.sh: installs the Go toolchain, fetches
# Debian bookworm's `kubernetes` source package (v1.20.2) into the directory given as $1 (emptied
# first) and applies the patches every binary built from it needs. Prints the source tree's path
# on stdout (logs on stderr). Build in that tree with e2e/kube-make.sh.
set -euo pipefail

work="${1:?usage: kube-source.sh WORKDIR}"

export DEBIAN_FRONTEND=noninteractive
missing=()
for p in golang-1.19-go rsync golang-github-modern-go-reflect2-dev dpkg-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# Source entries mirroring the binary ones the machine already uses.
src_list=/etc/apt/sources.list.d/ferrovip-deb-src.sources
if [ ! -e "$src_list" ] && [ ! -e "${src_list%.sources}.list" ]; then
  if [ -e /etc/apt/sources.list.d/debian.sources ]; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources >"$src_list"
  else
    grep -E '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' >"${src_list%.sources}.list"
  fi
  apt-get update -qq >&2
fi

rm -rf "$work"
mkdir -p "$work"
cd "$work"
echo "fetching the kubernetes source package" >&2
apt-get source -qq kubernetes >&2
src=$(find "$work" -maxdepth 1 -type d -name 'kubernetes-*' | head -n 1)
[ -n "$src" ] || { echo "apt-get source kubernetes produced no tree" >&2; exit 1; }

# The vendored reflect2 1.0.1 crashes on custom-resource writes with Go >= 1.18; Debian's
# packaged copy is fixed.
vendored="$src/vendor/github.com/modern-go/reflect2"
packaged=/usr/share/gocode/src/github.com/modern-go/reflect2
[ -d "$vendored" ] && [ -d "$packaged" ] || { echo "reflect2 sources not found" >&2; exit 1; }
rm -f "$vendored"/*.go "$vendored"/*.s
cp "$packaged"/*.go "$vendored"/
cp "$packaged"/*.s "$vendored"/ 2>/dev/null || true
rm -f "$vendored"/*_test.go

# kube-openapi's validator treats a value equal to its type's zero value as null; with Go >=
# 1.19 that comparison holds for "" (both sides share reflect's zero value), so every empty
# string in a custom resource (a condition's message, say) is refused as null. Upstream's fix
# is to test for nil only.
patched=0
while IFS= read -r f; do
  if grep -q 'if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {' "$f"; then
    sed -i 's/if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {/if data == nil {/' "$f"
    patched=$((patched + 1))
  fi
done < <(find "$src/vendor" -path '*validate/type.go')
[ "$patched" -gt 0 ] || { echo "the empty-string validation patch found nothing to change" >&2; exit 1; }

echo "$src"
