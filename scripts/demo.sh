#!/usr/bin/env bash
# Brings up the whole system on this machine (Debian, as root): installs what is missing,
# builds, creates a demo user, starts a blade-agent, a dispatcher on the embedded store and
# ws-proxy serving noVNC, dispatches a desktop for the demo user and prints the URL that
# opens it. Stays up until Ctrl-C, then stops everything it started.
#
# Settings (environment): DEMO_USER (vncdemo), DEMO_PORT (6080, ws-proxy), DEMO_LISTEN_IP
# (127.0.0.1; 0.0.0.0 to reach the demo from other machines), DEMO_STATE (/var/lib/vncdispatch-demo),
# BIN_DIR (use these prebuilt binaries instead of building).
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO_USER="${DEMO_USER:-vncdemo}"
DEMO_PORT="${DEMO_PORT:-6080}"
DEMO_LISTEN_IP="${DEMO_LISTEN_IP:-127.0.0.1}"
DEMO_STATE="${DEMO_STATE:-/var/lib/vncdispatch-demo}"
AGENT_PORT="${AGENT_PORT:-7501}"
DISPATCHER_PORT="${DISPATCHER_PORT:-7500}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/vncdispatch/target}"

say() { echo "demo: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: run as root (it creates a user and starts desktops as that user): sudo $0" >&2
  exit 1
fi

if [ -z "${BIN_DIR:-}" ]; then
  QUIET=1 SKIP_AUTOBAHN=1 scripts/install-deps.sh
  say "building (release)…"
  cargo build --release --quiet --bins
  BIN_DIR="$CARGO_TARGET_DIR/release"
fi

id "$DEMO_USER" >/dev/null 2>&1 || { say "creating user $DEMO_USER"; useradd -m -s /bin/bash "$DEMO_USER"; }

# A port already taken (often a demo still running in another terminal) would make a service
# exit into its log while the URL pointed at whatever else answers there: refuse up front.
for port in "$AGENT_PORT" "$DISPATCHER_PORT" "$DEMO_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "demo: port $port is in use (a demo already running? see ss -ltnp); set AGENT_PORT, DISPATCHER_PORT or DEMO_PORT" >&2
    exit 1
  fi
done

mkdir -p "$DEMO_STATE"
chmod 755 "$DEMO_STATE"
install -m 755 deploy/demo-session "$DEMO_STATE/demo-session"
[ -f "$DEMO_STATE/agent-secret" ] || "$BIN_DIR/blade-agent" init-secret "$DEMO_STATE/agent-secret"

# Every gRPC hop is mutual TLS: a CA of the demo's own and a certificate per role, made once
# with `dispatcher pki` (kept in $DEMO_STATE/pki for the next run).
PKI="$DEMO_STATE/pki"
[ -f "$PKI/ca.pem" ] || "$BIN_DIR/dispatcher" pki init --dir "$PKI" --name "vncdispatch demo CA" >/dev/null
issue() { # NAME ROLE [--host H]…
  local name=$1 role=$2; shift 2
  [ -f "$PKI/$name.pem" ] || "$BIN_DIR/dispatcher" pki issue --dir "$PKI" --name "$name" --role "$role" "$@" >/dev/null
}
issue agent agent --host 127.0.0.1 --host localhost
issue dispatcher dispatcher --host 127.0.0.1 --host localhost
issue proxy proxy
issue admin admin
tls() { echo --ca "$PKI/ca.pem" --cert "$PKI/$1.pem" --key "$PKI/$1.key"; }
# The command-line client (blade add, dispatch, session end) as admin.
export DISPATCHER_URL="https://127.0.0.1:$DISPATCHER_PORT"
export DISPATCHER_CLIENT_CA="$PKI/ca.pem" DISPATCHER_CLIENT_CERT="$PKI/admin.pem" DISPATCHER_CLIENT_KEY="$PKI/admin.key"
# Browsers reach ws-proxy over plain HTTP in the demo; off loopback that must be said.
insecure=()
case "$DEMO_LISTEN_IP" in
  127.*) ;;
  *) insecure=(--insecure-plaintext); say "ws-proxy on $DEMO_LISTEN_IP serves plain HTTP (--insecure-plaintext); use --tls-cert/--tls-key beyond a demo" ;;
esac

# The services run in sessions of their own, so a Ctrl-C reaches only this script, which then
# ends the demo desktop through the dispatcher before stopping the services.
pids=()
cleanup() {
  say "stopping"
  "$BIN_DIR/dispatcher" session end "$DEMO_USER" >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # They need not be this shell's children (see start_service): wait until they are gone.
  for _ in $(seq 100); do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts NAME's COMMAND in a session of its own, logging to NAME.log, and records the pid the
# service itself writes: setsid forks when this script leads its process group (under
# `timeout`, from some shells), and $! would then name a process already gone.
start_service() { # NAME COMMAND…
  local name=$1; shift
  rm -f "$DEMO_STATE/$name.pid"
  # shellcheck disable=SC2016 # $$ and $0 belong to the inner sh
  setsid sh -c 'echo $$ >"$0"; exec "$@"' "$DEMO_STATE/$name.pid" "$@" 2>>"$DEMO_STATE/$name.log" &
}
# shellcheck disable=SC2046 # tls prints three flag/path pairs, word-split on purpose
start_service blade-agent "$BIN_DIR/blade-agent" serve --listen "127.0.0.1:$AGENT_PORT" \
  --secret-file "$DEMO_STATE/agent-secret" $(tls agent) --rfb-listen 127.0.0.1 \
  --run-dir "$DEMO_STATE/agent-run" --session-command "$DEMO_STATE/demo-session"
# shellcheck disable=SC2046
start_service dispatcher "$BIN_DIR/dispatcher" serve --listen "127.0.0.1:$DISPATCHER_PORT" \
  --store "$DEMO_STATE/dispatcher.redb" --agent-secret-file "$DEMO_STATE/agent-secret" $(tls dispatcher)
# shellcheck disable=SC2046
start_service ws-proxy "$BIN_DIR/ws-proxy" serve --listen "$DEMO_LISTEN_IP:$DEMO_PORT" \
  --dispatcher "$DISPATCHER_URL" $(tls proxy) --auth-proxy "${insecure[@]}"
for name in blade-agent dispatcher ws-proxy; do
  for _ in $(seq 50); do [ -s "$DEMO_STATE/$name.pid" ] && break; sleep 0.05; done
  # No pid file: a number no process has (never 0, which would signal this whole group).
  pids+=("$(cat "$DEMO_STATE/$name.pid" 2>/dev/null || echo 999999999)")
done

for _ in $(seq 100); do
  "$BIN_DIR/dispatcher" blade list >/dev/null 2>&1 && (exec 3<>"/dev/tcp/127.0.0.1/$DEMO_PORT") 2>/dev/null && break
  sleep 0.1
done
names=(blade-agent dispatcher ws-proxy)
for i in 0 1 2; do
  if ! kill -0 "${pids[$i]}" 2>/dev/null; then
    echo "demo: ${names[$i]} did not start; the end of $DEMO_STATE/${names[$i]}.log:" >&2
    tail -5 "$DEMO_STATE/${names[$i]}.log" >&2
    exit 1
  fi
done
"$BIN_DIR/dispatcher" blade add local 127.0.0.1 --port "$AGENT_PORT" >/dev/null
session=$("$BIN_DIR/dispatcher" dispatch "$DEMO_USER" 127.0.0.1)
token=$(awk '$1 == "token" { print $2 }' <<<"$session")
host=$DEMO_LISTEN_IP; [ "$host" = 0.0.0.0 ] && host=$(hostname -f 2>/dev/null || hostname)

say "blade-agent, dispatcher and ws-proxy are up (logs in $DEMO_STATE)"
echo
echo "Open this URL in a browser to see $DEMO_USER's desktop:"
echo
echo "  http://$host:$DEMO_PORT/vnc.html?autoconnect=1&reconnect=true&reconnect_delay=2000&path=websockify?token=$token"
echo
say "ws-proxy logs in to the desktop for the browser (auth-proxy mode), so the URL holds no password,"
say "over TLS pinned to the desktop's own certificate; every gRPC hop is mutual TLS (certificates in $PKI)."
say "Ctrl-C stops everything."
wait
