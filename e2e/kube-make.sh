#!/usr/bin/env bash
# The Go recipe shared by e2e/apiserver/build.sh and e2e/cluster/build.sh: runs `make` in a
# source tree prepared by e2e/kube-source.sh. Usage: kube-make.sh SRC 'cmd/a cmd/b'.
# Static binaries (CGO off), offline (vendored modules only), Debian's Go 1.19.
set -euo pipefail
src="${1:?usage: kube-make.sh SRC WHAT}"
what="${2:?usage: kube-make.sh SRC WHAT}"
cd "$src"
PATH="/usr/lib/go-1.19/bin:$PATH" GOPROXY=off CGO_ENABLED=0 GOFLAGS=-mod=vendor \
  make WHAT="$what" >&2
