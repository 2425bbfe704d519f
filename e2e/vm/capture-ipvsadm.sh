#!/usr/bin/env bash
# Records the generic netlink messages Debian's ipvsadm exchanges with a real IPVS kernel, as
# golden vectors for ferrovip's IPVS codec: boots the VM image (e2e/vm/build.sh), runs a fixed
# list of ipvsadm commands under strace there, and writes tests/data/ipvsadm-netlink.txt:
#
#   # family-id <n>                the IPVS family id the CTRL getfamily exchange resolved
#   # ipvsadm <args>               one command, followed by its messages in order:
#   > <hex>                        a message ipvsadm sent (whole nlmsghdr included)
#   < <hex>                        a message of the IPVS family the kernel answered with
#
# Only IPVS-family messages are kept (no CTRL lookups, ACKs or NLMSG_DONE). nlmsg_seq and
# nlmsg_pid (bytes 8..16) are whatever that run used: compare them masked. Dump answers come
# in the order of the kernel's service hash table, which may differ from one boot to the next.
set -euo pipefail
cd "$(dirname "$0")/../.."

out="${1:-tests/data/ipvsadm-netlink.txt}"
commands=(
  "-A -t 10.0.0.1:80 -s rr"
  "-A -u 10.0.0.1:53 -s wlc -p 300"
  "-A --sctp-service 10.0.0.1:9 -s rr"
  "-A -t [2001:db8::1]:443 -s sh"
  "-A -f 7 -s mh"
  "-a -t 10.0.0.1:80 -r 10.0.0.2:8080 -m -w 3"
  "-a -t 10.0.0.1:80 -r 10.0.0.3 -g -w 1"
  "-a -t 10.0.0.1:80 -r 10.0.0.4 -i"
  "-a -t [2001:db8::1]:443 -r [2001:db8::2]:8443 -m -w 1"
  "-e -t 10.0.0.1:80 -r 10.0.0.2:8080 -m -w 0"
  "-d -t 10.0.0.1:80 -r 10.0.0.4"
  "-E -t 10.0.0.1:80 -s lc"
  "-D -u 10.0.0.1:53"
  "-Ln"
)

image="$(bash e2e/vm/build.sh)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/run/ferrovip"
{
  for c in "${commands[@]}"; do
    echo "echo '@@command $c'"
    echo "strace -f -xx -e trace=sendmsg,sendto,recvmsg,recvfrom -e write=all -e read=all -o /tmp/trace ipvsadm $c >/tmp/stdout"
    echo 'echo "@@status $?"; cat /tmp/trace; echo @@end'
  done
} >"$work/run/ferrovip/run.sh"
(cd "$work/run" && find ferrovip | cpio --quiet -o -H newc -R 0:0) >"$work/run.cpio"
cat "$image/base.cpio" "$work/run.cpio" >"$work/initrd.cpio"

echo "capture: booting $image" >&2
timeout 300 qemu-system-x86_64 -accel tcg -cpu max -nodefaults -no-user-config -nographic \
  -serial stdio -no-reboot -fw_cfg name=etc/sercon-port,string=0 -m 1024 -smp 2 \
  -kernel "$image/vmlinuz" -initrd "$work/initrd.cpio" -append "console=ttyS0 quiet panic=-1" \
  </dev/null 2> >(grep -v 'sercon-port' >&2) | tr -d '\r' >"$work/console"
grep -q '^FERROVIP-VM-EXIT=0$' "$work/console" ||
  { tail -n 40 "$work/console" >&2; echo "capture: the VM run failed" >&2; exit 1; }

python3 - "$work/console" "$out" "$(cat "$image/kernel-version")" <<'PY'
import re
import sys

console, out, kernel = sys.argv[1:4]
GENL_ID_CTRL = 0x10
CTRL_CMD_NEWFAMILY = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_FAMILY_ID = 1
syscall = re.compile(r"^\d+\s+(sendmsg|sendto|recvmsg|recvfrom)\((.*)\) = (-?\d+)")
dump = re.compile(r"^ \| [0-9a-f]{5}  ((?:[0-9a-f]{2} {1,2}){1,16})")


def messages(buf):
    while len(buf) >= 16:
        length = int.from_bytes(buf[0:4], "little")
        if length < 16 or length > len(buf):
            raise SystemExit(f"capture: bad netlink length {length}")
        yield buf[:length]
        buf = buf[(length + 3) & ~3:]


def attrs(payload):
    while len(payload) >= 4:
        length = int.from_bytes(payload[0:2], "little")
        kind = int.from_bytes(payload[2:4], "little") & 0x3FFF
        if length < 4:
            return
        yield kind, payload[4:length]
        payload = payload[(length + 3) & ~3:]


# Each command: its exit status and the (direction, bytes) of every syscall buffer, in order.
commands = []
current = None
call = None
for line in open(console, encoding="utf-8", errors="replace"):
    line = line.rstrip("\n")
    if line.startswith("@@command "):
        current = {"command": line[len("@@command "):], "calls": [], "status": None}
        commands.append(current)
    elif line.startswith("@@status "):
        current["status"] = int(line.split()[1])
    elif line == "@@end":
        call = None
    elif current is not None and (m := syscall.match(line)):
        name, args = m.group(1), m.group(2)
        # libnl peeks at every reply before reading it: keep only the real read.
        if "MSG_PEEK" in args:
            call = None
        else:
            call = {"sent": name.startswith("send"), "data": bytearray()}
            current["calls"].append(call)
    elif call is not None and (m := dump.match(line)):
        call["data"] += bytes.fromhex(m.group(1).replace(" ", ""))

family_id = None
for c in commands:
    for call in c["calls"]:
        if call["sent"]:
            continue
        for msg in messages(bytes(call["data"])):
            kind = int.from_bytes(msg[4:6], "little")
            if kind != GENL_ID_CTRL or msg[16] != CTRL_CMD_NEWFAMILY:
                continue
            found = dict(attrs(msg[20:]))
            if found.get(CTRL_ATTR_FAMILY_NAME, b"").rstrip(b"\0") == b"IPVS":
                fid = int.from_bytes(found[CTRL_ATTR_FAMILY_ID][:2], "little")
                if family_id not in (None, fid):
                    raise SystemExit(f"capture: IPVS family id changed {family_id} -> {fid}")
                family_id = fid
if family_id is None:
    raise SystemExit("capture: no CTRL getfamily answer for IPVS in the trace")

lines = [
    "# Generic netlink messages of Debian's ipvsadm (IPVS family only), captured with strace",
    f"# in a VM on Debian kernel {kernel} by e2e/vm/capture-ipvsadm.sh; do not edit by hand.",
    "# '>' sent by ipvsadm, '<' answered by the kernel; nlmsg_seq and nlmsg_pid vary per run,",
    "# and so does the order of dump answers (the kernel walks a hash table).",
    f"# family-id {family_id}",
]
for c in commands:
    if c["status"] != 0:
        raise SystemExit(f"capture: `ipvsadm {c['command']}` exited {c['status']}")
    lines.append(f"# ipvsadm {c['command']}")
    for call in c["calls"]:
        for msg in messages(bytes(call["data"])):
            if int.from_bytes(msg[4:6], "little") == family_id:
                lines.append(("> " if call["sent"] else "< ") + msg.hex())
with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
print(f"capture: wrote {out} (family id {family_id}, {len(commands)} commands)", file=sys.stderr)
PY
