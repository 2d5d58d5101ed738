#!/usr/bin/env bash
# Installs the Debian packages that build the non-Python clients under clients/, and the browser
# the chat page is tested in, idempotently: nothing is downloaded when every package of the asked
# languages is installed already.
#
#   scripts/install_toolchains.sh [go] [cpp] [java] [browser]     (no argument: all four)
#
# TypeScript needs only Node.js and npm (clients/typescript installs its own npm packages).
# Needs root (apt-get); prints what it installs and how long it took.
set -euo pipefail

declare -A PACKAGES=(
  # golang-google-grpc-dev accepts either Go protobuf compatibility package and apt picks the 1.3
  # one by default, whose codec panics on the first APIv2 message: ask for 1.5 by name.
  [go]="golang-go protobuf-compiler protoc-gen-go protoc-gen-go-grpc golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev golang-google-grpc-dev"
  [cpp]="g++ cmake make pkgconf protobuf-compiler protobuf-compiler-grpc libprotobuf-dev libgrpc++-dev"
  # Debian's libgrpc-java declares almost none of the jars grpc-netty needs at run time: list them.
  # grpc_java_plugin annotates stubs with javax.annotation.Generated, gone from the JDK: geronimo.
  # Debian's netty lacks the JDK ALPN negotiator, so TLS (HTTP/2 needs ALPN) goes through tcnative.
  # Playwright drives Debian's Chromium in the chat page's test (tests/e2e/test_browser.py); a
  # font, so that the page's screenshot shows text.
  [browser]="chromium fonts-dejavu-core"
  # JUnit 4 (with its hamcrest) runs the Java client's unit tests (`make test-client-java`).
  [java]="default-jdk-headless protobuf-compiler protobuf-compiler-grpc-java-plugin libprotobuf-java libgrpc-java libgoogle-common-protos-java libguava-java libgoogle-gson-java libnetty-java libperfmark-java libjsr305-java liberror-prone-java libanimal-sniffer-java libopencensus-java libgeronimo-annotation-1.3-spec-java libnetty-tcnative-java libnetty-tcnative-jni junit4"
)

langs=("$@")
[[ ${#langs[@]} -gt 0 ]] || langs=(go cpp java browser)

wanted=()
for lang in "${langs[@]}"; do
  [[ -n ${PACKAGES[$lang]:-} ]] || { echo "unknown language: $lang (go, cpp, java, browser)" >&2; exit 2; }
  read -r -a pkgs <<<"${PACKAGES[$lang]}"
  wanted+=("${pkgs[@]}")
done

missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null | grep -qx installed || missing+=("$pkg")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "toolchains for ${langs[*]}: installed"
  exit 0
fi

sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)
start=$SECONDS
echo "installing: ${missing[*]}"
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null
echo "toolchains for ${langs[*]}: installed in $((SECONDS - start)) s"
