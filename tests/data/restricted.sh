#!/bin/sh
# restricted.sh STATE_DIR -- COMMAND...: runs COMMAND as the chart's agent container runs:
# in a new mount namespace where every mount but /proc, /dev and STATE_DIR is read-only,
# /proc/sys too (runc mounts it so for unprivileged containers), with only CAP_NET_ADMIN and
# CAP_NET_RAW (bounding set, hence permitted and effective for root) and no_new_privs
# (allowPrivilegeEscalation: false).
state=$1; shift
[ "$1" = "--" ] && shift
exec unshare --mount --propagation private sh -c '
  set -e
  state=$1; shift
  mount --bind "$state" "$state"
  for mp in $(awk "{print \$5}" /proc/self/mountinfo | sort -u); do
    case "$mp" in /proc|/proc/*|/dev|/dev/*|"$state") continue;; esac
    mount -o remount,bind,ro "$mp"
  done
  mount --bind /proc/sys /proc/sys
  mount -o remount,bind,ro /proc/sys
  exec setpriv --bounding-set=-all,+net_admin,+net_raw --inh-caps=-all --no-new-privs -- "$@"
' sh "$state" "$@"
