#!/usr/bin/env bash
# Installs everything the build, the tests and the local demo need on a fresh Debian machine.
# Idempotent and quiet when everything is already there: each step checks before it acts.
set -euo pipefail

log() { [ -n "${QUIET:-}" ] || echo "install-deps: $*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: must run as root (apt-get, useradd); try: sudo $0" >&2
    exit 1
  fi
}

# Debian packages: the real TigerVNC, noVNC, websockify (for comparison), sshd, a browser,
# protoc for the proto crate, and a small window manager for demo desktops.
DEB_PKGS=(tigervnc-standalone-server tigervnc-tools novnc websockify openssh-server chromium
          protobuf-compiler twm x11-utils procps)

missing=()
for p in "${DEB_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  need_root
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# FerretDB v1 speaks the MongoDB wire protocol; no MongoDB server package can be installed here.
FERRETDB_VERSION=v1.24.2
GOBIN_DIR="${GOBIN:-$(go env GOPATH 2>/dev/null || echo /root/go)/bin}"
if [ "${SKIP_FERRETDB:-}" = "" ] && ! "$GOBIN_DIR/ferretdb" --version 2>/dev/null | grep -q "${FERRETDB_VERSION#v}"; then
  log "installing FerretDB $FERRETDB_VERSION with go install"
  GOFLAGS=-mod=mod go install "github.com/FerretDB/FerretDB/cmd/ferretdb@$FERRETDB_VERSION"
fi
