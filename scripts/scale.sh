#!/usr/bin/env bash
# The scale rig (docs/scale.md): hundreds of real blade agents, a stand-in Xvnc per desktop,
# one dispatcher on the embedded store and two on one FerretDB, two ws-proxies; curves of
# latency, throughput, memory and CPU as blades and sessions grow, written to docs/scale/
# (scale.tsv and PNGs). Root; not part of CI. About 25 minutes on a 2-core machine with the
# defaults; SCALE_BLADES, SCALE_SESSIONS, SCALE_STORES, SCALE_CALLS and SCALE_OUT change them
# (see tests/benches/scale.rs). It leaves accounts vsc00000… behind for the next run.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
if [ "$(id -u)" -ne 0 ]; then
  echo "scale.sh: must run as root (it creates accounts and starts desktops as them)" >&2
  exit 1
fi
QUIET=1 scripts/install-deps.sh
if ! command -v gnuplot >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gnuplot-nox >/dev/null
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/vncdispatch/target}"
export SCALE_OUT="${SCALE_OUT:-$ROOT/docs/scale}"
# FerretDB v1 on SQLite slows with every stored session (docs/scale.md): a shorter curve.
export SCALE_SESSIONS_FERRETDB="${SCALE_SESSIONS_FERRETDB:-1000}"
export SCALE_CALLS_FERRETDB="${SCALE_CALLS_FERRETDB:-100}"
cargo build -q --release --workspace
cargo bench -q -p vncdispatch-tests --bench scale
gnuplot -e "dir='$SCALE_OUT'" docs/scale/plot.gp
echo "scale.sh: tables and plots in $SCALE_OUT"
