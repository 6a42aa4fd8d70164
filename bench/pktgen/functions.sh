# Helpers in the style of the kernel's samples/pktgen/functions.sh: write
# commands to /proc/net/pktgen and fail loudly when pktgen refuses one.

PGDIR=/proc/net/pktgen

err() { echo "ERROR: $*" >&2; exit 2; }
info() { [ -n "$VERBOSE" ] && echo "INFO: $*" >&2; return 0; }

# pg_set FILE "command args": write one command, check pktgen's Result line.
pg_set() {
    local file="$PGDIR/$1"; shift
    info "$file <- $*"
    echo "$*" > "$file" || err "write '$*' to $file failed"
    if grep -q "^Result: OK" "$file" 2>/dev/null || ! grep -q "^Result:" "$file" 2>/dev/null; then
        return 0
    fi
    err "pktgen refused '$*' in $file: $(grep '^Result:' "$file")"
}
pg_ctrl()   { pg_set pgctrl "$@"; }
pg_thread() { local t=$1; shift; pg_set "kpktgend_$t" "$@"; }
pg_dev()    { local d=$1; shift; pg_set "$d" "$@"; }

require_pktgen() {
    [ "$(id -u)" -eq 0 ] || err "run as root"
    if [ ! -d "$PGDIR" ]; then
        modprobe pktgen 2>/dev/null || err "the pktgen module is not available on this kernel (CONFIG_NET_PKTGEN)"
    fi
    [ -d "$PGDIR" ] || err "$PGDIR missing after loading pktgen"
}
