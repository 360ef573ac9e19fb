#!/usr/bin/env bash
# Build the step-ca test harness (tests/stepca/harness/main.go) against the Go
# source of Smallstep step-ca 0.19 shipped by Debian
# (golang-github-smallstep-certificates-dev, under /usr/share/gocode).
#
# No network access besides the Debian mirror is needed: the build runs in
# GOPATH mode (GO111MODULE=off), never touching the Go module proxy.
#
# The binary is cached in ${RECONCILER_STEPCA_CACHE:-$HOME/.cache/reconciler}
# and reused while the harness source, the Debian package version and the Go
# version are unchanged. The last line on stdout is the binary path; all build
# chatter goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="${here}/../tests/stepca/harness/main.go"
pkg=golang-github-smallstep-certificates-dev
gocode=/usr/share/gocode
certs_src="${gocode}/src/github.com/smallstep/certificates"
cache="${RECONCILER_STEPCA_CACHE:-${HOME:-/root}/.cache/reconciler}"

log() { printf 'build-step-ca: %s\n' "$*" >&2; }

[ -f "$src" ] || { log "harness source not found: $src"; exit 1; }

# 1. Toolchain + step-ca sources (Debian packages).
if ! command -v go >/dev/null 2>&1 || [ ! -d "$certs_src/commands" ]; then
    log "installing golang-go and $pkg with apt-get"
    if [ "$(id -u)" != 0 ]; then
        log "not root: cannot apt-get install golang-go $pkg"; exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends golang-go "$pkg" >&2; then
        log "apt-get install failed; running apt-get update and trying again"
        apt-get update >&2
        apt-get install -y --no-install-recommends golang-go "$pkg" >&2
    fi
    log "installed golang-go and $pkg"
fi
command -v go >/dev/null 2>&1 || { log "go not found after install"; exit 1; }
[ -d "$certs_src/commands" ] || { log "$certs_src missing after install"; exit 1; }

# 2. Cache key: harness source + package version + go version.
pkgver="$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null || echo unknown)"
gover="$(go version)"
key="$( { sha256sum "$src" | cut -d' ' -f1; echo "$pkgver"; echo "$gover"; } | sha256sum | cut -c1-16)"
outdir="${cache}/step-ca"
bin="${outdir}/harness-${key}"

mkdir -p "$outdir"
exec 9>"${outdir}/.build.lock"
flock 9   # serialise concurrent builds (e.g. pytest-xdist workers)

if [ -x "$bin" ]; then
    log "reusing $bin (step-ca $pkgver)"
    echo "$bin"
    exit 0
fi

# 3. Build in a private GOPATH; /usr/share/gocode provides every dependency.
gopath="${outdir}/gopath"
pkgdir="${gopath}/src/reconciler-stepca-harness"
rm -rf "$pkgdir"
mkdir -p "$pkgdir"
cp "$src" "$pkgdir/main.go"
log "building harness against step-ca $pkgver ($gover); the first build takes a few minutes ..."
start=$(date +%s)
(
    cd "$pkgdir"
    GO111MODULE=off \
    GOPATH="${gopath}:${gocode}" \
    GOCACHE="${outdir}/gocache" \
    GOFLAGS= \
    GOPROXY=off \
    CGO_CFLAGS="-O2 -Wno-deprecated-declarations" \
    go build -trimpath -o "${bin}.tmp" . >&2
)
mv -f "${bin}.tmp" "$bin"
# Drop binaries of older keys.
find "$outdir" -maxdepth 1 -name 'harness-*' ! -name "harness-${key}" -type f -delete 2>/dev/null || true
log "built $bin in $(( $(date +%s) - start ))s"
echo "$bin"
