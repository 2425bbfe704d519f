#!/usr/bin/env bash
# Builds the qemu image that runs ferrovip's IPVS tests on a real Debian kernel (this host's
# kernel has no IPVS): the newest linux-image-6.1.0-*-cloud-amd64 from Debian, and a base
# initramfs with busybox, the network modules, ipvsadm, iproute2, nft and strace. Each test
# run appends its own small cpio archive (binaries, command) to base.cpio; see
# e2e/harness/src/vm.rs.
#
# Cached under ~/.cache/ferrovip/vm-<kernel version>-<harness revision>/ (vmlinuz, base.cpio,
# a `ready` stamp); a second run only checks the packages. Prints that directory on stdout;
# sourced instead, it exports it as FERROVIP_VM_DIR.
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
  FERROVIP_VM_DIR="$(bash "${BASH_SOURCE[0]}")" && export FERROVIP_VM_DIR
  return
fi
set -euo pipefail

# Bump whenever what goes into the image (files, /init, module list) changes, so an image
# built by an older script is never reused.
harness_revision=h2

cache="${FERROVIP_CACHE:-$HOME/.cache/ferrovip}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export DEBIAN_FRONTEND=noninteractive

log() { echo "vm/build: $*" >&2; }

# Host tools: qemu runs the image; the rest are copied into it (ipvsadm, ip, nft, strace,
# busybox) or build it (cpio, depmod); objcopy strips test binaries before they are packed.
pkgs=(qemu-system-x86 busybox-static ipvsadm nftables iproute2 cpio strace kmod binutils)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

newest_kernel_package() {
  apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' |
    awk '{print $1}' | sort -V | tail -n 1
}
package="$(newest_kernel_package)"
if [ -z "$package" ]; then
  apt-get update -qq >&2
  package="$(newest_kernel_package)"
fi
[ -n "$package" ] || { log "apt-cache knows no linux-image-6.1.0-*-cloud-amd64"; exit 1; }
version="${package#linux-image-}"

dir="$cache/vm-$version-$harness_revision"
if [ -e "$dir/ready" ]; then
  echo "$dir"
  exit 0
fi

started=$(date +%s)
log "building $dir from $package"
work="$cache/tmp-vm-build.$$"
rm -rf "$work"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/deb"
if ! (cd "$work/deb" && apt-get download -q "$package") >&2; then
  # The package lists may name a kernel the archive has since replaced: refresh them and
  # start over once (the newest package, and so the cache directory, may change).
  [ -z "${FERROVIP_VM_REFRESHED:-}" ] || exit 1
  apt-get update -qq >&2
  rm -rf "$work"
  FERROVIP_VM_REFRESHED=1 exec bash "$0" "$@"
fi
dpkg -x "$work"/deb/*.deb "$work/kernel"
modules="$work/kernel/lib/modules/$version"
[ -f "$work/kernel/boot/vmlinuz-$version" ] && [ -d "$modules" ] ||
  { log "$package holds no vmlinuz or modules for $version"; exit 1; }
# The .deb carries no modules.dep: Debian's postinst runs depmod.
depmod -b "$work/kernel" "$version"

# --- the module set: everything networking tests may want, with its dependencies ------------
wanted=()
while IFS= read -r ko; do
  wanted+=("$(basename "$ko" .ko)")
done < <(cd "$modules/kernel" && find net/netfilter net/ipv4 net/ipv6 net/bridge net/sched \
  net/8021q net/sctp net/packet net/llc net/802 -name '*.ko' 2>/dev/null)
for m in veth macvlan ipvlan dummy ifb vxlan tun nlmon; do
  [ -n "$(find "$modules/kernel/drivers/net" -name "$m.ko" -print -quit)" ] && wanted+=("$m")
done
# The NIC of runs with a network (VmRun::network): virtio-net over qemu's virtio PCI
# transport, both modules in Debian's cloud kernel.
wanted+=(virtio_pci virtio_net)

root="$work/root"
mkdir -p "$root"
# modprobe --show-depends lists each module's whole chain as `insmod <path>` lines.
for m in "${wanted[@]}"; do
  modprobe -d "$work/kernel" -S "$version" --show-depends "$m" 2>/dev/null || true
done | awk '$1 == "insmod" {print $2}' | sort -u | while IFS= read -r ko; do
  rel="${ko#"$work/kernel/"}"
  mkdir -p "$root/usr/$(dirname "$rel")"
  cp "$ko" "$root/usr/$rel"
done
cp "$modules"/modules.builtin "$modules"/modules.builtin.modinfo "$modules"/modules.order \
  "$root/usr/lib/modules/$version/"
# Again over the subset, so modules.dep names only what the image holds.
depmod -b "$root/usr" "$version"

# Loaded at boot: IPVS with every scheduler this kernel has, and what the labs build on. The
# FTP helper is left out: it rewrites port 21 traffic, which no test wants by surprise.
boot_modules=(ip_vs)
while IFS= read -r ko; do
  m="$(basename "$ko" .ko)"
  case "$m" in ip_vs | ip_vs_ftp) ;; *) boot_modules+=("$m") ;; esac
done < <(find "$root/usr/lib/modules/$version/kernel/net/netfilter/ipvs" -name 'ip_vs_*.ko' | sort)
for m in veth bridge macvlan ipvlan dummy ipip ip6_tunnel nf_conntrack nf_nat nf_tables \
  nft_ct nft_nat nft_masq nft_chain_nat nft_redir nft_numgen nft_hash nft_limit nft_fib_inet \
  nft_reject_inet nft_compat nfnetlink_queue sch_netem virtio_pci virtio_net; do
  [ -n "$(find "$root/usr/lib/modules/$version" -name "$m.ko" -print -quit)" ] && boot_modules+=("$m")
done

# --- the root file system (merged /usr, like the host) -----------------------------------------
mkdir -p "$root"/usr/{bin,sbin,lib,lib64} "$root"/{proc,sys,dev,tmp,run,etc,root,var,ferrovip}
ln -s usr/bin "$root/bin"
ln -s usr/sbin "$root/sbin"
ln -s usr/lib "$root/lib"
ln -s usr/lib64 "$root/lib64"
ln -s ../run "$root/var/run"
# The kernel opens /dev/console for init before anything is mounted.
mknod -m 600 "$root/dev/console" c 5 1
mknod -m 666 "$root/dev/null" c 1 3

# A library lands where the host's loader finds it: the directory with symlinks resolved, the
# file under the name the binary asks for.
copy_with_libraries() {
  local bin="$1" dest="$2" lib target
  cp -L "$bin" "$root$dest"
  while IFS= read -r lib; do
    target="$(readlink -f "$(dirname "$lib")")/$(basename "$lib")"
    if [ ! -e "$root$target" ]; then
      mkdir -p "$root$(dirname "$target")"
      cp -L "$lib" "$root$target"
    fi
  done < <(ldd "$bin" | grep -oE '/[^ ]+' | grep -v '^/.*:$')
}
copy_with_libraries /usr/sbin/ipvsadm /usr/sbin/ipvsadm
copy_with_libraries "$(readlink -f /usr/bin/ip)" /usr/bin/ip
copy_with_libraries /usr/sbin/nft /usr/sbin/nft
copy_with_libraries /usr/bin/strace /usr/bin/strace
# nft and the resolver-free libc calls read these.
cp /etc/protocols /etc/services "$root/etc/"
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"

cp /usr/bin/busybox "$root/usr/bin/busybox"
while IFS= read -r applet; do
  # The real tools above win over busybox's smaller applets of the same name.
  [ -e "$root/usr/bin/$(basename "$applet")" ] || [ -e "$root/usr/sbin/$(basename "$applet")" ] &&
    continue
  case "$applet" in
    bin/* | usr/bin/*) ln -s busybox "$root/usr/bin/$(basename "$applet")" ;;
    sbin/* | usr/sbin/*) ln -s ../bin/busybox "$root/usr/sbin/$(basename "$applet")" ;;
  esac
done < <(/usr/bin/busybox --list-full)

mkdir -p "$root/etc/ferrovip"
printf '%s\n' "${boot_modules[@]}" >"$root/etc/ferrovip/modules"
echo "$version" >"$root/etc/ferrovip/kernel"
install -m 0755 "$here/init" "$root/init"

(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$work/base.cpio"

mkdir -p "$dir"
cp "$work/kernel/boot/vmlinuz-$version" "$dir/vmlinuz"
mv "$work/base.cpio" "$dir/base.cpio"
echo "$version" >"$dir/kernel-version"
printf '%s\n' "${boot_modules[@]}" >"$dir/boot-modules"
touch "$dir/ready"
# Images of older kernels or harness revisions are never used again.
for old in "$cache"/vm-*; do
  [ "$old" = "$dir" ] || [ ! -d "$old" ] || rm -rf "$old"
done
log "built in $(($(date +%s) - started)) s: $(du -sh "$dir/base.cpio" | cut -f1) base.cpio"
echo "$dir"
