#!/usr/bin/env bash
# Installs Autobahn|Testsuite's `wstest` (the WebSocket fuzzing client ws-proxy's conformance
# test runs) as /usr/local/bin/wstest. Idempotent and quiet when it is already there.
#
# The suite is Python 2 only and Debian 12 has no Python 2, so this unpacks Debian 11's
# python2.7 packages (and the two libraries of theirs that Debian 12 no longer ships) into
# $PREFIX without installing them system-wide, then installs the pinned Python packages from
# PyPI with a Python 2 capable pip. Nothing outside $PREFIX and the wrapper is touched.
set -euo pipefail

PREFIX="${AUTOBAHN_PREFIX:-/opt/vncdispatch/autobahn}"
WRAPPER="${WSTEST_BIN:-/usr/local/bin/wstest}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
REQS="$HERE/tests/autobahn/requirements-py27.txt"
STAMP="$PREFIX/.installed"
log() { [ -n "${QUIET:-}" ] || echo "install-autobahn: $*" >&2; }

if [ -x "$WRAPPER" ] && cmp -s "$REQS" "$STAMP" && "$WRAPPER" --autobahnversion >/dev/null 2>&1; then
  exit 0
fi
log "installing Autobahn|Testsuite into $PREFIX"

MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBS=(
  pool/main/p/python2.7/python2.7-minimal_2.7.18-8+deb11u1_amd64.deb
  pool/main/p/python2.7/libpython2.7-minimal_2.7.18-8+deb11u1_amd64.deb
  pool/main/p/python2.7/libpython2.7-stdlib_2.7.18-8+deb11u1_amd64.deb
  pool/main/p/python2.7/python2.7_2.7.18-8+deb11u1_amd64.deb
  pool/main/o/openssl/libssl1.1_1.1.1w-0+deb11u1_amd64.deb
  pool/main/libf/libffi/libffi7_3.3-6_amd64.deb
)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$PREFIX"
mkdir -p "$PREFIX/root" "$PREFIX/site"
for deb in "${DEBS[@]}"; do
  curl -fsS --retry 3 -o "$work/$(basename "$deb")" "$MIRROR/$deb"
  dpkg-deb -x "$work/$(basename "$deb")" "$PREFIX/root"
done

# pip 20.3.4 is the last pip that runs on Python 2; fetched with the system pip, run unpacked.
python3 -m pip download -q --no-deps -d "$work" pip==20.3.4 setuptools==44.1.1 wheel==0.37.1
mkdir -p "$work/pip" && python3 -m zipfile -e "$work"/pip-20.3.4-*.whl "$work/pip"

py2() {
  PYTHONHOME="$PREFIX/root/usr" LD_LIBRARY_PATH="$PREFIX/root/usr/lib/x86_64-linux-gnu" \
    PYTHONPATH="$PREFIX/site:$work/pip" "$PREFIX/root/usr/bin/python2.7" "$@"
}
pipq() { py2 -m pip -q --disable-pip-version-check --no-python-version-warning "$@"; }
pipq install --no-warn-script-location --target "$PREFIX/site" "$work"/setuptools-*.whl "$work"/wheel-*.whl 2>&1 \
  | { grep -v "already exists" || true; } >&2
pipq install --no-warn-script-location --no-deps --target "$PREFIX/site" -r "$REQS"

cat > "$WRAPPER" <<WRAP
#!/bin/sh
# Autobahn|Testsuite wstest on a private Python 2.7 (see scripts/install-autobahn.sh).
export PYTHONHOME="$PREFIX/root/usr" LD_LIBRARY_PATH="$PREFIX/root/usr/lib/x86_64-linux-gnu"
unset PYTHONPATH
exec "$PREFIX/root/usr/bin/python2.7" -c '
import site, sys
site.addsitedir("$PREFIX/site")  # processes the zope namespace .pth file
import txaio
txaio.use_twisted()  # autobahn 0.10.9 with txaio 2.3 needs the framework chosen up front
from autobahntestsuite.wstest import run
sys.argv[0] = "wstest"
run()
' "\$@"
WRAP
chmod 755 "$WRAPPER"
"$WRAPPER" --autobahnversion >/dev/null
cp "$REQS" "$STAMP"
log "installed $("$WRAPPER" --autobahnversion 2>&1 | head -1)"
