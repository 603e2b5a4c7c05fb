#!/usr/bin/env bash
# The scale rig (docs/scale.md): 200 real blade agents, each in its own PID namespace,
# starting a stand-in Xvnc per desktop as real accounts; one dispatcher on the embedded store
# and two on one FerretDB; two ws-proxies; curves of latency, throughput, memory and CPU as
# blades and sessions grow, written to docs/scale/ (scale.tsv and PNGs). Root; not part of
# CI; about 10 minutes on a 2-core machine with the defaults. SCALE_BLADES, SCALE_SESSIONS,
# SCALE_STORES, SCALE_CALLS, SCALE_OPENS (and their _FERRETDB / _EMBEDDED forms) and
# SCALE_OUT change them (see tests/benches/scale.rs).
#
# It removes the accounts vsc00000… it made (and their homes) when it ends, however it ends:
# left in /etc/passwd and /etc/shadow, tens of thousands of lines make every PAM login and
# NSS lookup on the machine slower (a desktop start here, +10 ms). SCALE_KEEP_ACCOUNTS=1 keeps
# them for the next run; `scripts/scale.sh clean` removes them and the stand-in programs.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
if [ "$(id -u)" -ne 0 ]; then
  echo "scale.sh: must run as root (it creates accounts and starts desktops as them)" >&2
  exit 1
fi
remove_accounts() {
  sed -i '/^vsc[0-9]\{5\}:/d' /etc/passwd /etc/shadow
  find /home -maxdepth 1 -name 'vsc[0-9][0-9][0-9][0-9][0-9]' -exec rm -rf {} +
}
if [ "${1:-}" = clean ]; then
  remove_accounts
  rm -rf /var/cache/vncdispatch/scale-bin
  echo "scale.sh: removed the rig's accounts, homes and stand-in programs"
  exit 0
fi
if [ "${SCALE_KEEP_ACCOUNTS:-0}" != 1 ]; then
  trap 'remove_accounts; echo "scale.sh: removed the rig'"'"'s accounts (SCALE_KEEP_ACCOUNTS=1 keeps them)"' EXIT
fi
# cargo installed by rustup for root, when the shell has not sourced its env
[ -d "$HOME/.cargo/bin" ] && PATH="$HOME/.cargo/bin:$PATH"
QUIET=1 scripts/install-deps.sh
if ! command -v gnuplot >/dev/null || ! command -v cc >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends gnuplot-nox gcc libc6-dev >/dev/null
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/vncdispatch/target}"
export SCALE_OUT="${SCALE_OUT:-$ROOT/docs/scale}"
# FerretDB v1 on SQLite scans its whole collection for every lookup (docs/scale.md): its curve
# stops at 1,000 sessions, with fewer calls per point.
export SCALE_SESSIONS_FERRETDB="${SCALE_SESSIONS_FERRETDB:-100,300,1000}"
export SCALE_CALLS_FERRETDB="${SCALE_CALLS_FERRETDB:-50}"
export SCALE_OPENS_FERRETDB="${SCALE_OPENS_FERRETDB:-100}"
cargo build -q --release --workspace
cargo bench -q -p vncdispatch-tests --bench scale
gnuplot -e "dir='$SCALE_OUT'; src='$ROOT/docs/scale'" docs/scale/plot.gp
echo "scale.sh: tables and plots in $SCALE_OUT"
