#!/bin/sh
# What the kernel alone charges for a pod's veth pair, without any tartan code: N pairs
# created with `ip -batch` (host end up on a bridge, one queue per end, peer moved into a
# fresh namespace), then hairpin on each port; once with nobody listening to link
# notifications, once while `ip monitor all` listens in the node namespace. Needs root;
# everything lives in namespaces named vkc<pid>-* and is removed on exit.
# Run: sh benches/veth_kernel_cost.sh [N]   (N = 100). Results: docs/benchmarks.md.
set -eu
N=${1:-100}
P=vkc$$
TMP=$(mktemp -d)
cleanup() {
    [ -n "${MON:-}" ] && kill "$MON" 2>/dev/null || true
    for ns in $(ip netns list | awk '{print $1}' | grep "^$P-" || true); do
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

ip netns add "$P-h"
ip -n "$P-h" link add br0 type bridge
ip -n "$P-h" link set br0 up

now_us() { echo $(($(date +%s%N) / 1000)); }

# Prints the microseconds per pair of creating N pairs, then of turning hairpin on N ports.
round() {
    i=1
    : >"$TMP/add"
    : >"$TMP/hairpin"
    : >"$TMP/del"
    while [ "$i" -le "$N" ]; do
        ip netns add "$P-p$i"
        echo "link add h$i up master br0 numtxqueues 1 numrxqueues 1 type veth peer name eth0 numtxqueues 1 numrxqueues 1 netns /run/netns/$P-p$i" >>"$TMP/add"
        echo "link set h$i type bridge_slave hairpin on" >>"$TMP/hairpin"
        echo "link del h$i" >>"$TMP/del"
        i=$((i + 1))
    done
    t0=$(now_us)
    ip -n "$P-h" -batch "$TMP/add"
    t1=$(now_us)
    ip -n "$P-h" -batch "$TMP/hairpin"
    t2=$(now_us)
    echo "$1: veth pair $(((t1 - t0) / N)) us, hairpin $(((t2 - t1) / N)) us (per pair, $N pairs)"
    i=1
    while [ "$i" -le "$N" ]; do
        ip netns del "$P-p$i"
        i=$((i + 1))
    done
    ip -n "$P-h" -batch "$TMP/del" 2>/dev/null || true
}

round "nobody listening     "
ip -n "$P-h" monitor all >/dev/null &
MON=$!
sleep 0.5
round "'ip monitor all' runs"
