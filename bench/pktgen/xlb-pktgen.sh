#!/bin/bash
# Drive traffic at an xlb balancer from a separate generator host with the
# kernel's pktgen, in the style of samples/pktgen/pktgen_sample*.sh.
#
# pktgen sends UDP, so benchmark a UDP VIP (the datapath is the same for TCP
# established flows: parse, connection table, MAC rewrite, XDP_TX). Many
# flows come from a range of source ports (and optionally source addresses).
#
#   ./xlb-pktgen.sh -i eth1 -m <balancer MAC> -d 10.0.0.100 -p 9 \
#       -s 64 -t 4 -f 10000 -r 1000000 -D 30
#
# Options:
#   -i DEV      generator NIC facing the balancer              (required)
#   -m MAC      destination MAC: the balancer's NIC             (required)
#   -d VIP      destination IPv4 address: the VIP               (required)
#   -p PORT     destination UDP port (default 9)
#   -s SIZE     frame size in bytes, without FCS (default 64)
#   -t THREADS  pktgen threads = CPUs used (default 1)
#   -f FLOWS    distinct source ports per thread (default 1000)
#   -S SRC      source IPv4 base address (default 198.18.0.1); with -F N,
#               N addresses from it
#   -r PPS      packets per second per thread (default 0 = line rate)
#   -n COUNT    packets per thread (default 0 = until -D)
#   -D SECONDS  stop after this long (default 10); always bounded
#   -v          verbose
#
# While it runs, on the balancer: `xlb stats --watch` (forwarded/s, drops by
# reason, connection table), `ethtool -S <nic>` (rx drops, xdp_tx_errors),
# `mpstat -P ALL 1` (softirq load per CPU). See the README.
set -euo pipefail
here=$(dirname "$(readlink -f "$0")")
. "$here/functions.sh"

DEV= DST_MAC= VIP= PORT=9 SIZE=64 THREADS=1 FLOWS=1000 SRC=198.18.0.1 SRC_N=1 PPS=0 COUNT=0 DURATION=10 VERBOSE=
while getopts "i:m:d:p:s:t:f:S:F:r:n:D:v" o; do
    case $o in
        i) DEV=$OPTARG ;; m) DST_MAC=$OPTARG ;; d) VIP=$OPTARG ;; p) PORT=$OPTARG ;;
        s) SIZE=$OPTARG ;; t) THREADS=$OPTARG ;; f) FLOWS=$OPTARG ;; S) SRC=$OPTARG ;;
        F) SRC_N=$OPTARG ;; r) PPS=$OPTARG ;; n) COUNT=$OPTARG ;; D) DURATION=$OPTARG ;;
        v) VERBOSE=1 ;; *) sed -n '2,30p' "$0"; exit 2 ;;
    esac
done
[ -n "$DEV" ] && [ -n "$DST_MAC" ] && [ -n "$VIP" ] || { sed -n '2,30p' "$0"; err "-i, -m and -d are required"; }
[[ $DST_MAC =~ ^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$ ]] || err "bad MAC $DST_MAC"
[[ $VIP =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || err "bad VIP $VIP (IPv4)"
for n in PORT SIZE THREADS FLOWS SRC_N PPS COUNT DURATION; do
    [[ ${!n} =~ ^[0-9]+$ ]] || err "-$n must be a number"
done
[ "$DURATION" -ge 1 ] && [ "$DURATION" -le 3600 ] || err "-D must be 1..3600 seconds"
[ "$SIZE" -ge 60 ] && [ "$SIZE" -le 9000 ] || err "-s must be 60..9000"
[ -e "/sys/class/net/$DEV" ] || err "no device $DEV"
require_pktgen

src_last() { # base address + n - 1
    local IFS=.; read -r a b c d <<< "$1"
    local v=$(( (a << 24) + (b << 16) + (c << 8) + d + $2 - 1 ))
    echo "$(( v >> 24 & 255 )).$(( v >> 16 & 255 )).$(( v >> 8 & 255 )).$(( v & 255 ))"
}

pg_ctrl "reset"
for ((t = 0; t < THREADS; t++)); do
    d="$DEV@$t"
    pg_thread "$t" "rem_device_all"
    pg_thread "$t" "add_device $d"
    pg_dev "$d" "count $COUNT"
    pg_dev "$d" "pkt_size $((SIZE - 4))"   # pktgen adds the 4-byte FCS
    pg_dev "$d" "dst_mac $DST_MAC"
    pg_dev "$d" "dst $VIP"
    pg_dev "$d" "src_min $SRC"
    pg_dev "$d" "src_max $(src_last "$SRC" "$SRC_N")"
    pg_dev "$d" "udp_dst_min $PORT"
    pg_dev "$d" "udp_dst_max $PORT"
    # Each thread its own block of source ports: FLOWS flows per thread.
    pg_dev "$d" "udp_src_min $((1024 + t * FLOWS))"
    pg_dev "$d" "udp_src_max $((1024 + (t + 1) * FLOWS - 1))"
    pg_dev "$d" "flag UDPSRC_RND"
    pg_dev "$d" "flag NO_TIMESTAMP"
    pg_dev "$d" "burst 32"
    [ "$PPS" -gt 0 ] && pg_dev "$d" "ratep $PPS"
    pg_dev "$d" "queue_map_min $t"
    pg_dev "$d" "queue_map_max $t"
done

echo "pktgen: $THREADS thread(s) → $VIP:$PORT via $DEV ($DST_MAC), ${SIZE}B, $FLOWS flows/thread, ${PPS:-line} pps/thread, ≤ ${DURATION}s"
pg_ctrl "start" &
pid=$!
sleep "$DURATION"
echo "stop" > "$PGDIR/pgctrl" || true
wait "$pid" 2>/dev/null || true
for ((t = 0; t < THREADS; t++)); do
    echo "--- $DEV@$t"
    grep -E "^Result:|pps|errors" "$PGDIR/$DEV@$t" || true
done
