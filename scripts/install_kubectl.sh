#!/usr/bin/env bash
# Installs kubectl (Debian's kubernetes-client) unless one is on the PATH already: the
# Kubernetes tests render deploy/kubernetes with `kubectl kustomize`. Needs root (apt-get).
set -euo pipefail
if command -v kubectl >/dev/null; then
  echo "kubectl: installed"
  exit 0
fi
sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
  kubernetes-client >/dev/null
echo "kubectl: installed"
