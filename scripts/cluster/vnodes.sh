#!/usr/bin/env bash
# An emulated multi-node cluster on one machine (test and benchmark tooling; docs/clusters.md,
# "A cluster on one machine").
#
#   scripts/cluster/vnodes.sh start K DIR [--rate R]   K nodes vnode0..vnode{K-1}; writes
#                                                      DIR/hostfile and DIR/mpiexec
#   scripts/cluster/vnodes.sh stop DIR                 kill every process inside the nodes, remove
#                                                      every namespace and link start made
#   scripts/cluster/vnodes.sh rate DIR R               reshape every link of a running cluster to R
#                                                      ("unshaped" removes the shaping)
#   scripts/cluster/vnodes.sh status DIR               what start made, and whether it is still there
#
# What a node is: a network namespace (its own loopback and one veth "eth0" with the address
# 10.201.ID.(i+1)/24), and, for every process launched on it, a fresh UTS namespace with the
# hostname vnode<i> and a mount namespace where DIR/hosts is bind-mounted on /etc/hosts. The
# nodes' veths end on a bridge that lives in a namespace of its own (the "switch"), so no address,
# link or route is added to the machine's own network namespace, and nothing can reach anything
# but the other nodes. With --rate R every node's link is shaped to R in both directions with a
# token-bucket filter (tc tbf: node -> switch on the node's eth0, switch -> node on the switch's
# port). There is no added latency (this kernel has no netem): a real fabric's alpha of 1-5 us
# (InfiniBand) or 20-50 us (TCP over Ethernet) is not emulated, only bandwidth is.
#
# DIR/mpiexec -n N [launcher options] COMMAND... starts N ranks in block placement (ranks
# 0..ceil(N/K)-1 on vnode0, ...) with the MPI the command's Python was built against:
#   * MPICH (the mpich wheel): hydra with -launcher ssh -launcher-exec DIR/agent -iface eth0, and
#     UCX_TLS=tcp,self unless UCX_TLS is set: otherwise UCX sees one machine behind the namespaces
#     and moves "inter-node" bytes through shared memory, and the shaped link carries nothing.
#   * Open MPI: mpirun with plm_rsh_agent DIR/agent, pml ob1, btl self,vader,tcp, and the TCP BTL
#     and the out-of-band channel restricted to the nodes' subnet; OMPI_MCA_osc=sm,pt2pt and
#     MPI4PY_RC_THREAD_LEVEL=serialized unless set (Open MPI 4.1 has no one-sided component for
#     TCP that accepts MPI_THREAD_MULTIPLE: LSGD/EASGD's windows fail without them).
# Inside a node ranks share memory as on a real node (MPICH's shm, Open MPI's vader); between
# nodes they talk TCP over the shaped link. The launcher itself runs on vnode0, as on a real
# cluster's first node. DIR/agent HOST CMD is the "ssh": it enters HOST's namespaces and runs CMD
# with the caller's environment (a real ssh would start a login environment; here the
# environment, and so the virtual environment, carries over).
#
# Needs root, ip, tc, nsenter and unshare; without them it prints "SKIPPED: <why>" and exits 0
# (MPIDL_REQUIRE_CLUSTER=1: exit 1). Bad input (K < 1, a rate tc refuses, start on a DIR in use,
# stop on a DIR never started) is one line and exit 2, with nothing left behind.
set -Eeuo pipefail
PROG="vnodes.sh"
here=$(cd "$(dirname "$0")" && pwd)

die() { echo "$PROG: $*" >&2; exit 2; }
skip() {
    echo "$PROG: SKIPPED: $*"
    [ "${MPIDL_REQUIRE_CLUSTER:-0}" = 1 ] && exit 1
    exit 0
}
usage() {
    echo "usage: $PROG start K DIR [--rate R] | stop DIR | rate DIR R|unshaped | status DIR" >&2
    exit 2
}

prereqs() {
    [ "$(id -u)" = 0 ] || skip "needs root (network namespaces, veth pairs, tc)"
    local t
    for t in ip tc nsenter unshare; do
        command -v "$t" >/dev/null 2>&1 || skip "'$t' not found (Debian: iproute2, util-linux)"
    done
}

# The names of one cluster: namespaces mpidl-vn<ID>-sw (the switch) and mpidl-vn<ID>-<i>; the
# subnet 10.201.<ID>.0/24. ID is taken at start (the first one no namespace uses) and kept in
# DIR/vnodes.env, which stop reads: stop removes what that file names, nothing found by pattern.
ns_switch() { echo "mpidl-vn$1-sw"; }
ns_node() { echo "mpidl-vn$1-$2"; }

free_id() {
    local id
    for id in $(seq 1 250); do
        if ! ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$(ns_switch "$id")"; then
            echo "$id"; return 0
        fi
    done
    return 1
}

# The token bucket's depth: 2 ms of traffic, at least 32 KiB (MPIDL_VNODES_BURST=BYTES overrides).
# A deeper bucket lets a link that idled during compute send a whole model at veth speed: with 10 ms
# (1.25 MB at 1 Gbit/s) a 1.2 MB exchange took 4-7 ms instead of its 10 ms at the rate; with 2 ms
# (256 KiB) 8.6-9 ms; and 12.5 MB take 0.104 s at 1 Gbit/s and 1.06 s at 100 Mbit/s (issue 29).
burst_of() {  # burst_of BITS -> bytes
    local b=${MPIDL_VNODES_BURST:-$(( $1 / 8 / 500 ))}
    [ "$b" -ge 32768 ] || b=32768
    echo "$b"
}
rate_bits() {  # rate_bits R -> bits/s, or nothing when R is not a rate tc's syntax accepts here
    python3 - "$1" <<'PY' 2>/dev/null || true
import re, sys
m = re.fullmatch(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps|tbps)", sys.argv[1].lower())
if m:
    v, u = float(m.group(1)), m.group(2)
    mult = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
            "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}[u]
    if v * mult >= 8000:
        print(int(v * mult))
PY
}

shape() {  # shape NETNS DEV RATE BURST
    ip netns exec "$1" tc qdisc replace dev "$2" root tbf rate "$3" burst "$4" latency 100ms
}

teardown() {  # teardown ID K: kill the nodes' processes (by pid), delete the namespaces
    local id=$1 k=$2 i ns pids
    for i in $(seq 0 $((k - 1))) sw; do
        if [ "$i" = sw ]; then ns=$(ns_switch "$id"); else ns=$(ns_node "$id" "$i"); fi
        [ -e "/run/netns/$ns" ] || continue
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        if [ -n "$pids" ]; then
            kill -TERM $pids 2>/dev/null || true
            sleep 0.5
            pids=$(ip netns pids "$ns" 2>/dev/null || true)
            [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
        fi
        ip netns delete "$ns" 2>/dev/null || true
    done
}

cmd_start() {
    local k=${1:-} dir=${2:-} rate=""
    [ -n "$k" ] && [ -n "$dir" ] || usage
    shift 2
    while [ $# -gt 0 ]; do
        case $1 in
            --rate) [ $# -ge 2 ] || die "--rate needs a value (e.g. 1gbit, 100mbit)"; rate=$2; shift 2 ;;
            --rate=*) rate=${1#--rate=}; shift ;;
            *) die "unknown option '$1' (start K DIR [--rate R])" ;;
        esac
    done
    [[ $k =~ ^[0-9]+$ ]] && [ "$k" -ge 1 ] || die "K must be a whole number >= 1, got '$k'"
    [ "$k" -le 200 ] || die "K must be <= 200, got $k"
    local bits="" burst=""
    if [ -n "$rate" ]; then
        bits=$(rate_bits "$rate")
        [ -n "$bits" ] || die "rate '$rate' is not one tc accepts here (a number and one of bit, kbit, mbit, gbit, tbit, bps, kbps, mbps, gbps; at least 8kbit), e.g. 1gbit or 100mbit"
        burst=$(burst_of "$bits")
    fi
    prereqs
    dir=$(realpath -m "$dir")
    if [ -f "$dir/vnodes.env" ]; then
        die "$dir is in use by a running emulated cluster ($(. "$dir/vnodes.env"; echo "$VN_K nodes, id $VN_ID")); run '$PROG stop $dir' first or choose another DIR"
    fi
    mkdir -p "$dir"
    local id
    id=$(free_id) || die "no free cluster id (250 emulated clusters exist?)"
    local sw i ns addr
    sw=$(ns_switch "$id")
    # From here on, a failure removes whatever was made (nothing left behind).
    trap 'teardown "$id" "$k"; rm -f "$dir/vnodes.env.tmp"' ERR
    ip netns add "$sw"
    ip -n "$sw" link set lo up
    ip -n "$sw" link add br0 type bridge
    ip -n "$sw" link set br0 up
    : > "$dir/hosts.tmp"
    echo "127.0.0.1 localhost" >> "$dir/hosts.tmp"
    for i in $(seq 0 $((k - 1))); do
        ns=$(ns_node "$id" "$i")
        addr="10.201.$id.$((i + 1))"
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        ip -n "$sw" link add "p$i" type veth peer name eth0 netns "$ns"
        ip -n "$sw" link set "p$i" master br0 up
        ip -n "$ns" addr add "$addr/24" dev eth0
        ip -n "$ns" link set eth0 up
        if [ -n "$rate" ]; then
            if ! shape "$ns" eth0 "$rate" "$burst" 2>"$dir/tc.err" || ! shape "$sw" "p$i" "$rate" "$burst" 2>>"$dir/tc.err"; then
                teardown "$id" "$k"; trap - ERR
                rm -f "$dir/hosts.tmp"
                die "tc refused rate '$rate': $(head -c 200 "$dir/tc.err" | tr '\n' ' ')"
            fi
        fi
        echo "$addr vnode$i" >> "$dir/hosts.tmp"
    done
    rm -f "$dir/tc.err"
    mv "$dir/hosts.tmp" "$dir/hosts"
    : > "$dir/hostfile"
    for i in $(seq 0 $((k - 1))); do echo "vnode$i" >> "$dir/hostfile"; done
    install -m 755 "$here/vnodes-agent.sh" "$dir/agent"
    install -m 755 "$here/vnodes-mpiexec.sh" "$dir/mpiexec"
    cat > "$dir/vnodes.env.tmp" <<ENV
VN_ID=$id
VN_K=$k
VN_RATE=${rate:-unshaped}
VN_RATE_BITS=${bits:-0}
VN_BURST=${burst:-0}
VN_SUBNET=10.201.$id.0/24
VN_DIR=$dir
ENV
    mv "$dir/vnodes.env.tmp" "$dir/vnodes.env"
    rm -f "$dir/stopped"
    trap - ERR
    echo "[vnodes] up: $k node(s) vnode0..vnode$((k - 1)) on 10.201.$id.0/24, links ${rate:-unshaped}" \
         "(no added latency); launch with $dir/mpiexec -n N COMMAND"
}

cmd_stop() {
    local dir=${1:-}
    [ -n "$dir" ] || usage
    dir=$(realpath -m "$dir")
    if [ ! -f "$dir/vnodes.env" ]; then
        if [ -f "$dir/stopped" ]; then echo "[vnodes] $dir: already stopped"; exit 0; fi
        die "$dir was never started (no $dir/vnodes.env); nothing to stop"
    fi
    prereqs
    # shellcheck disable=SC1091
    . "$dir/vnodes.env"
    teardown "$VN_ID" "$VN_K"
    rm -f "$dir/vnodes.env" "$dir/mpiexec" "$dir/agent"
    date -u +%FT%TZ > "$dir/stopped"
    echo "[vnodes] stopped: $VN_K node(s), id $VN_ID ($dir)"
}

cmd_rate() {
    local dir=${1:-} rate=${2:-} bits="" burst="" i ns sw
    [ -n "$dir" ] && [ -n "$rate" ] || usage
    dir=$(realpath -m "$dir")
    [ -f "$dir/vnodes.env" ] || die "$dir holds no running emulated cluster"
    if [ "$rate" != unshaped ]; then
        bits=$(rate_bits "$rate")
        [ -n "$bits" ] || die "rate '$rate' is not one tc accepts here (e.g. 1gbit, 100mbit; or unshaped)"
        burst=$(burst_of "$bits")
    fi
    prereqs
    # shellcheck disable=SC1091
    . "$dir/vnodes.env"
    sw=$(ns_switch "$VN_ID")
    for i in $(seq 0 $((VN_K - 1))); do
        ns=$(ns_node "$VN_ID" "$i")
        if [ "$rate" = unshaped ]; then
            ip netns exec "$ns" tc qdisc del dev eth0 root 2>/dev/null || true
            ip netns exec "$sw" tc qdisc del dev "p$i" root 2>/dev/null || true
        else
            shape "$ns" eth0 "$rate" "$burst" && shape "$sw" "p$i" "$rate" "$burst" || die "tc refused rate '$rate'"
        fi
    done
    sed -i -e "s/^VN_RATE=.*/VN_RATE=$rate/" -e "s/^VN_RATE_BITS=.*/VN_RATE_BITS=${bits:-0}/" \
        -e "s/^VN_BURST=.*/VN_BURST=${burst:-0}/" "$dir/vnodes.env"
    echo "[vnodes] links of $VN_K node(s) now $rate"
}

cmd_status() {
    local dir=${1:-}
    [ -n "$dir" ] || usage
    dir=$(realpath -m "$dir")
    [ -f "$dir/vnodes.env" ] || die "$dir holds no running emulated cluster"
    # shellcheck disable=SC1091
    . "$dir/vnodes.env"
    local i ns ok=0
    echo "[vnodes] $VN_K node(s), id $VN_ID, subnet $VN_SUBNET, links $VN_RATE"
    for i in $(seq 0 $((VN_K - 1))); do
        ns=$(ns_node "$VN_ID" "$i")
        if [ -e "/run/netns/$ns" ]; then
            echo "  vnode$i: namespace $ns, $(ip netns pids "$ns" 2>/dev/null | wc -l) process(es)"
        else
            echo "  vnode$i: namespace $ns is GONE"; ok=1
        fi
    done
    return $ok
}

case ${1:-} in
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    rate) shift; cmd_rate "$@" ;;
    status) shift; cmd_status "$@" ;;
    *) usage ;;
esac
