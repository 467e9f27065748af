#!/bin/sh
# Lists the system calls the agent makes in its real workload, to derive the container's
# seccomp allowlist (packaging/container/seccomp.json; docs/security.md says how it is kept).
# Root; build first (`cargo build --release -p lb-userspace`). Usage:
#   tests/tools/seccomp-trace.sh [path/to/lb]
# Runs, under `strace -f`, in a throw-away namespace pair joined by a veth with its own bpffs:
# `lb --version`; `lb run --config` with --metrics and an HTTP health check on a live sample
# backend; every API read and change (`vip`/`backend` add, drain, remove, `apply`, `stats`,
# `trace`, `reconcile`), every metrics path; SIGTERM with --keep-on-exit; a second `lb run`
# that adopts the pins, and its SIGTERM that detaches. Prints the union of the calls seen,
# one a line. Everything it makes is removed on exit.
set -eu
LB=${1:-target/release/lb}
LB=$(realpath "$LB")
TAG="sct$$"
NS_LB="${TAG}l"; NS_BE="${TAG}b"
DIR=$(mktemp -d)
BPFFS="$DIR/bpffs"; SOCK="$DIR/lb.sock"
cleanup() {
    [ -n "${AGENT:-}" ] && kill "$AGENT" 2>/dev/null || true
    [ -n "${SAMPLE:-}" ] && kill "$SAMPLE" 2>/dev/null || true
    sleep 0.5
    ip netns del "$NS_LB" 2>/dev/null || true
    ip netns del "$NS_BE" 2>/dev/null || true
    umount -l "$BPFFS" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT INT TERM
mkdir -p "$BPFFS"
mount -t bpf bpf "$BPFFS"
ip netns add "$NS_LB"; ip netns add "$NS_BE"
ip link add "${TAG}a" netns "$NS_LB" type veth peer name "${TAG}z" netns "$NS_BE"
ip -n "$NS_LB" addr add 10.250.0.1/24 dev "${TAG}a"
ip -n "$NS_BE" addr add 10.250.0.2/24 dev "${TAG}z"
for ns in "$NS_LB" "$NS_BE"; do ip -n "$ns" link set lo up; done
ip -n "$NS_LB" link set "${TAG}a" up; ip -n "$NS_BE" link set "${TAG}z" up
ip netns exec "$NS_BE" "$LB" samples --count 1 --base-port 8080 --bind 10.250.0.2 --duration 120 >/dev/null &
SAMPLE=$!
cat >"$DIR/lb.toml" <<EOF
[[vip]]
address = "10.250.0.100:8080/tcp"
health = { kind = "http", path = "/", interval_ms = 200, timeout_ms = 150, fall = 3, rise = 2 }
backend = [ { address = "10.250.0.2" } ]
EOF
agent() {
    strace -f -qq -e signal=none -o "$DIR/trace.run$1" ip netns exec "$NS_LB" "$LB" --socket "$SOCK" run \
        --iface "${TAG}a" --mode generic --bpffs "$BPFFS" --state-file "$DIR/state.json" \
        --metrics 127.0.0.1:9464 --keep-on-exit $2 >"$DIR/out.$1" 2>&1 &
    TRACER=$!
    for _ in $(seq 100); do
        AGENT=$(pgrep -P "$TRACER" || true)
        grep -q "serving the control API" "$DIR/out.$1" && return
        sleep 0.1
    done
    cat "$DIR/out.$1" >&2; exit 1
}
"$LB" --version >/dev/null
agent 1 "--config $DIR/lb.toml"
sleep 1.5
cli() { "$LB" --socket "$SOCK" "$@" >/dev/null; }
cli vip add 10.250.0.101:80/tcp --health tcp --interval-ms 200 --timeout-ms 150
cli backend add 10.250.0.101:80/tcp 10.250.0.2 --weight 200
cli backend drain 10.250.0.101:80/tcp 10.250.0.2
cli stats; cli vip list; cli trace 192.0.2.1:5000 10.250.0.101:80/tcp
cli backend remove 10.250.0.101:80/tcp 10.250.0.2
cli apply -f "$DIR/lb.toml"; cli reconcile
for path in /metrics / /status.json /healthz /readyz /status.json; do
    ip netns exec "$NS_LB" curl -fsS -o /dev/null "http://127.0.0.1:9464$path"
    sleep 0.6
done
sleep 5   # NAT sweeps, history saves, egress upkeep
kill -TERM "$AGENT"; wait "$TRACER" || true
agent 2 ""
sleep 1.5
kill -TERM "$AGENT"; wait "$TRACER" || true
AGENT=
"$LB" --socket "$SOCK" detach --iface "${TAG}a" --bpffs "$BPFFS" >/dev/null 2>&1 || true
# `ip netns exec` is traced too (it execs lb in place): for its process, count only what
# follows the execve of lb; every other process is one of lb's threads.
for f in "$DIR"/trace.run*; do
    awk -v lb="$LB" '
        NR == 1 { first = $1 }
        $1 == first && !started { if ($2 ~ /^execve\(/ && index($0, "\"" lb "\"")) started = 1; else next }
        { name = ($2 == "<...") ? $3 : $2; sub(/\(.*/, "", name); print name }
    ' "$f"
done | grep -E '^[a-z_0-9]+$' | sort -u
