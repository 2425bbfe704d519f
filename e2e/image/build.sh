#!/usr/bin/env bash
# Builds the ferrovip image from the top-level Containerfile with buildah (no daemon,
# --isolation chroot) and writes it as an OCI archive. Prints two lines: the archive's path,
# then the image's name (localhost/ferrovip:<tag>; also in <archive>.name).
#
#   e2e/image/build.sh [--binary PATH]
#
# Without --binary it builds the release binary (`cargo build --release --locked`). The root
# filesystem: the stripped binary at /usr/bin/ferrovip, the host's nft at /usr/sbin/nft, every
# shared library `ldd` names for them, and the loader. The tag is the crate's version and a
# hash of that filesystem, so a changed binary is a new image.
set -euo pipefail
cd "$(dirname "$0")/../.."

binary=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$(realpath "$2")"; shift 2 ;;
    *) echo "usage: $0 [--binary PATH]" >&2; exit 2 ;;
  esac
done
target="${CARGO_TARGET_DIR:-$PWD/target}"
if [ -z "$binary" ]; then
  echo "== cargo build --release --locked" >&2
  cargo build --release --locked >&2
  binary="$target/release/ferrovip"
fi
[ -x "$binary" ] || { echo "no executable at $binary" >&2; exit 1; }

need=()
command -v buildah >/dev/null || need+=(buildah)
command -v nft >/dev/null || need+=(nftables)
command -v strip >/dev/null || need+=(binutils)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

out="$target/image"
mkdir -p "$out"
ctx="$(mktemp -d "$out/ctx.XXXXXX")"
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/usr/bin" "$root/usr/sbin" "$root/run" "$root/tmp" "$root/var/lib/ferrovip" \
  "$root/etc" "$root/proc" "$root/sys" "$root/dev"
strip --strip-all -o "$root/usr/bin/ferrovip" "$binary"
nft="$(command -v nft)"
cp -L "$nft" "$root/usr/sbin/nft"

# Shared libraries and the loader: each real file once, at its real path, and the names the
# binaries ask for as symbolic links to it; the host's merged-/usr links (/lib -> usr/lib, ...)
# so that every path ldd printed resolves in the image as on the host.
for exe in "$root/usr/bin/ferrovip" "$root/usr/sbin/nft"; do
  ldd "$exe" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'
done | sort -u | while read -r lib; do
  real="$(readlink -f "$lib")"
  mkdir -p "$root$(dirname "$real")"
  cp -p "$real" "$root$real"
  dir="$(readlink -f "$(dirname "$lib")")"
  name="$(basename "$lib")"
  if [ "$dir/$name" != "$real" ]; then
    mkdir -p "$root$dir"
    if [ "$dir" = "$(dirname "$real")" ]; then
      ln -sfn "$(basename "$real")" "$root$dir/$name"
    else
      ln -sfn "$real" "$root$dir/$name"
    fi
  fi
done
for d in lib lib64 bin sbin; do
  if [ -L "/$d" ]; then
    ln -sfn "$(readlink "/$d")" "$root/$d"
  fi
done
[ -e "$root/lib64/ld-linux-x86-64.so.2" ] || [ "$(uname -m)" != x86_64 ] || {
  echo "the loader is missing from the image's root filesystem" >&2
  exit 1
}
chmod 0755 "$root/usr/bin/ferrovip" "$root/usr/sbin/nft"
chmod 1777 "$root/tmp"
cp Containerfile "$ctx/Containerfile"
# The image runs: both binaries start in its root filesystem alone.
chroot "$root" /usr/bin/ferrovip --version >&2
chroot "$root" /usr/sbin/nft --version >&2

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
hash="$(cd "$root" && find . -type f -o -type l | LC_ALL=C sort | tar -cf - --no-recursion --owner=0 --group=0 --mtime=@0 -T - | sha256sum | cut -c1-12)"
tag="$version-$hash"
name="localhost/ferrovip:$tag"
archive="$out/ferrovip-$tag.oci.tar"

if [ ! -s "$archive" ]; then
  export STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}"
  echo "== buildah bud $name" >&2
  buildah bud --isolation chroot --layers=false -f "$ctx/Containerfile" -t "$name" "$ctx" >&2
  rm -f "$archive.tmp"
  buildah push "$name" "oci-archive:$archive.tmp:$name" >&2
  buildah rmi "$name" >/dev/null 2>&1 || true
  mv "$archive.tmp" "$archive"
fi
echo "$name" > "$archive.name"
echo "== $name: archive $(du -h "$archive" | cut -f1), root filesystem $(du -sh "$root" | cut -f1)" >&2
echo "$archive"
echo "$name"
