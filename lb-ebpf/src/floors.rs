//! Benchmark-only programs (feature `floors`), built into a separate object
//! by `cargo xtask bench`; the shipped object has none of this.
//!
//! Floors: what any XDP L2-DSR balancer must at least pay, to compare xlb's
//! per-packet cost against. Generator and sink: live traffic over a veth.

use aya_ebpf::{
    bindings::{xdp_action, BPF_F_MMAPABLE},
    helpers::bpf_get_smp_processor_id,
    macros::{map, xdp},
    maps::{Array, LruHashMap, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use lb_common::{
    ct::{ct_hash, ct_now, ct_rank},
    hash::flow_hash,
    CtSeed, CtWay, FlowKey, VipKey, CT_WAYS, DEFAULT_RING_SIZE, FAMILY_V4,
};

use crate::pkt::{ptr_at, ptr_mut_at};

/// Stateless Maglev table of the floor: entry → backend MAC (8 bytes).
#[map(name = "FLOOR_RING")]
static FLOOR_RING: Array<[u8; 8]> = Array::with_max_entries(DEFAULT_RING_SIZE, 0);

/// Bench counters per CPU: 0 = generator runs, 1 = sink frames,
/// 2 = generator frames transmitted.
#[map(name = "BENCH_CNT")]
static BENCH_CNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(4, 0);

/// Number of distinct flows the generator cycles through (set at load).
#[no_mangle]
static BENCH_FLOWS: u32 = 1024;

/// The destination MAC the generator writes into every frame it sends (set
/// at load, first six bytes): in live-frames mode a page comes back to the
/// generator as the balancer left it (addressed to a backend), and xlb only
/// acts on frames addressed to itself.
#[no_mangle]
static BENCH_DST_MAC: [u8; 8] = [0; 8];

/// The generator transmits this many frames in 1024 runs (set at load,
/// 1..=1024, spread evenly): the offered rate is the live-frames rate times
/// `BENCH_KEEP / 1024`, fine enough to find a drop-free rate to ~0.1 %.
#[no_mangle]
static BENCH_KEEP: u32 = 1024;

/// Floor: return XDP_PASS.
#[xdp]
pub fn floor_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Floor: swap the MACs and send the frame back (a reflector).
#[xdp]
pub fn floor_macswap_tx(ctx: XdpContext) -> u32 {
    let Some(m) = ptr_mut_at::<[u8; 12]>(&ctx, 0) else { return xdp_action::XDP_PASS };
    // SAFETY: bounds checked by ptr_mut_at.
    let m = unsafe { &mut *m };
    let mut dst = [0u8; 6];
    dst.copy_from_slice(&m[..6]);
    m.copy_within(6..12, 0);
    m[6..].copy_from_slice(&dst);
    xdp_action::XDP_TX
}

/// Lines of `FLOOR_LINES`: 16 MiB of 64-byte lines.
const FLOOR_LINES_N: u32 = 1 << 18;

/// `floor_one_line`'s array: one random line per new flow.
#[map(name = "FLOOR_LINES")]
static FLOOR_LINES: Array<[u64; 8]> = Array::with_max_entries(FLOOR_LINES_N, BPF_F_MMAPABLE);

/// Lines of `FLOOR_LINES_CT`: as many as xlb's default connection table
/// has sets (51 MiB for 1 Mi flows).
const FLOOR_LINES_CT_N: u32 = lb_common::ct::ct_sets(lb_common::DEFAULT_CONNTRACK_SIZE);

/// `floor_one_line_ct`'s array: one random line per new flow, in as much
/// memory as xlb's default connection table (more TLB and page-walk misses
/// than 16 MiB).
#[map(name = "FLOOR_LINES_CT")]
static FLOOR_LINES_CT: Array<[u64; 8]> = Array::with_max_entries(FLOOR_LINES_CT_N, BPF_F_MMAPABLE);

/// Floor of xlb's own connection table: the stateless floor plus the
/// table's lookup and insert (`lb_common::ct`: the flow's two hashes, its
/// four ways matched, the victim ranked, the entry written) in an array of
/// the default table's size, behind the `new_flows` wrapper: the one-line
/// design without a VIP lookup, a scheduler or counters.
#[xdp]
pub fn floor_ct_insert(ctx: XdpContext) -> u32 {
    stateless(&ctx, |key, _| {
        let h = ct_hash(key, &CtSeed { k: [0x5eed_0001, 0x5eed_0002] }, FLOOR_LINES_CT_N);
        let Some(line) = FLOOR_LINES_CT.get_ptr_mut(h.set) else { return };
        let now = ct_now(crate::conntrack::now_ns());
        // Way `i` is words 2i (tag) and 2i + 1 (value), as in `CtSet`.
        let word = |j: usize| -> *mut u64 {
            // SAFETY: masked below 8: inside the 64-byte map value.
            unsafe { &mut (*line)[j & 7] as *mut u64 }
        };
        let (mut way, mut rank) = (0, 0);
        for i in 0..CT_WAYS {
            // SAFETY: valid, aligned map value words.
            let (tag, val) = unsafe { (core::ptr::read_volatile(word(2 * i)), core::ptr::read_volatile(word(2 * i + 1))) };
            if CtWay::matches(tag, val, &h) {
                // SAFETY: as above.
                unsafe { core::ptr::write_volatile(word(2 * i), CtWay::touched(tag, now, false)) };
                return;
            }
            let r = ct_rank(tag, val, now);
            if r > rank || i == 0 {
                (way, rank) = (i, r);
            }
        }
        let e = CtWay::new(&h, 1, 1, false, now);
        // SAFETY: as above.
        unsafe {
            core::ptr::write_volatile(word(2 * way + 1), e.val);
            core::ptr::write_volatile(word(2 * way), e.tag);
        }
    })
}

/// `floor_lru_insert`'s table: a 1 Mi-entry LRU hash keyed by the 5-tuple.
#[map(name = "FLOOR_LRU")]
static FLOOR_LRU: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(1 << 20, 0);

/// Floor: the least a Maglev L2-DSR balancer does: parse IPv4 and the ports,
/// one hash of the 5-tuple, one table read (the backend's MAC), rewrite both
/// MACs, XDP_TX. No VIP lookup, no state, no counters.
#[xdp]
pub fn floor_stateless_dsr(ctx: XdpContext) -> u32 {
    stateless(&ctx, |_, _| {})
}

/// Floor of a stateful new flow: the stateless floor plus a read-modify-write
/// of one random 64-byte line of a 16 MiB array (what a one-line connection
/// table cannot avoid), behind the `new_flows` wrapper.
#[xdp]
pub fn floor_one_line(ctx: XdpContext) -> u32 {
    stateless(&ctx, |_, h| bump_word(FLOOR_LINES.get_ptr_mut(h % FLOOR_LINES_N), h))
}

/// Rounds of `work`: `floor_one_line_work` does about as much work per
/// packet as an xlb new flow does besides its line (~60 ns here).
const WORK_ROUNDS: u64 = 32;

/// Floor: the stateless floor plus `WORK_ROUNDS` of ALU work, behind the
/// `new_flows` wrapper: the work's cost without any memory miss.
#[xdp]
pub fn floor_work(ctx: XdpContext) -> u32 {
    stateless(&ctx, |_, h| work::<WORK_ROUNDS>(h))
}

/// Floor: `floor_one_line` plus 4 rounds of work (~2 ns alone): shows that
/// `floor_one_line`'s figure rests on the next packets' misses overlapping
/// its own, which only a program that small gets.
#[xdp]
pub fn floor_one_line_nudge(ctx: XdpContext) -> u32 {
    stateless(&ctx, |_, h| line_and_work::<4>(h))
}

/// Floor: `floor_one_line` plus `floor_work`'s work: what one random line
/// costs a program that does a new flow's amount of work.
#[xdp]
pub fn floor_one_line_work(ctx: XdpContext) -> u32 {
    stateless(&ctx, |_, h| line_and_work::<WORK_ROUNDS>(h))
}

/// `floor_one_line`'s line, then `N` rounds of `work`.
#[inline(always)]
fn line_and_work<const N: u64>(h: u32) {
    bump_word(FLOOR_LINES.get_ptr_mut(h % FLOOR_LINES_N), h);
    work::<N>(h)
}

/// `N` rounds of two independent multiply-rotate chains on `h`: ALU work
/// that touches no memory and does not wait for the line.
#[inline(always)]
fn work<const N: u64>(h: u32) {
    let (mut a, mut b) = (h as u64, (h as u64) << 7);
    for i in 0..N {
        a = (a ^ i).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
        b = (b ^ i).wrapping_mul(0xC2B2_AE3D_27D4_EB4F).rotate_left(13);
    }
    let mut out = a ^ b;
    // SAFETY: a volatile write of a local: the work is not optimised away.
    unsafe { core::ptr::write_volatile(&mut out, out) };
}

/// Read-modify-write one word (picked by `h`) of a line, if there is one.
#[inline(always)]
fn bump_word(line: Option<*mut [u64; 8]>, h: u32) {
    if let Some(line) = line {
        // SAFETY: a valid map value; races between CPUs only lose counts.
        unsafe {
            let w = &mut (*line)[(h >> 24) as usize & 7];
            core::ptr::write_volatile(w, core::ptr::read_volatile(w) + 1);
        }
    }
}

/// `floor_one_line` over an array as large as xlb's default connection
/// table (not a target's floor: it shows what the table's size costs).
#[xdp]
pub fn floor_one_line_ct(ctx: XdpContext) -> u32 {
    stateless(&ctx, |_, h| {
        // Set index as the table derives it: high bits × sets.
        let i = ((h as u64 * FLOOR_LINES_CT_N as u64) >> 32) as u32;
        bump_word(FLOOR_LINES_CT.get_ptr_mut(i), h)
    })
}

/// Floor of an LRU-hash connection table: the stateless floor plus a lookup
/// and an insert of the 5-tuple in a 1 Mi-entry `LRU_HASH` (what the LRU
/// design cannot beat), behind the `new_flows` wrapper.
#[xdp]
pub fn floor_lru_insert(ctx: XdpContext) -> u32 {
    stateless(&ctx, |key, h| {
        // SAFETY: the value is only tested for presence.
        if unsafe { FLOOR_LRU.get(key) }.is_none() {
            let _ = FLOOR_LRU.insert(key, &(h as u64), 0);
        }
    })
}

/// The VIP `floor_forward` forwards (set at load, network order).
#[no_mangle]
static FLOOR_VIP: [u8; 4] = [0; 4];

/// Floor for real clients (nginx, ab, iperf3): the stateless floor attached
/// in xlb's place, forwarding IPv4 TCP to `FLOOR_VIP` by a hash of the
/// 5-tuple into `FLOOR_RING`; everything else (ARP, checks' replies) passes.
#[xdp]
pub fn floor_forward(ctx: XdpContext) -> u32 {
    let Some(h) = ptr_at::<[u8; 34]>(&ctx, 0) else { return xdp_action::XDP_PASS };
    // SAFETY: bounds checked; a read of a load-time constant.
    let (h, vip) = unsafe { (&*h, core::ptr::read_volatile(&FLOOR_VIP)) };
    if h[12..14] != [0x08, 0x00] || h[14 + 9] != 6 || h[30..34] != vip {
        return xdp_action::XDP_PASS;
    }
    stateless(&ctx, |_, _| {})
}

/// The stateless floor, with `state(key, hash)` run before the rewrite.
#[inline(always)]
fn stateless(ctx: &XdpContext, state: impl FnOnce(&FlowKey, u32)) -> u32 {
    let Some(ip) = ptr_at::<[u8; 20]>(ctx, 14) else { return xdp_action::XDP_PASS };
    // SAFETY: bounds checked.
    let ip = unsafe { &*ip };
    let l4 = 14 + ((ip[0] & 0x0f) as usize) * 4;
    let Some(p) = ptr_at::<[u16; 2]>(ctx, l4) else { return xdp_action::XDP_PASS };
    // SAFETY: bounds checked.
    let p = unsafe { &*p };
    let mut key = FlowKey {
        src: [0; 16],
        sport_be: p[0],
        _pad: 0,
        vip: VipKey { addr: [0; 16], port_be: p[1], proto: ip[9], family: FAMILY_V4 },
    };
    key.src[..4].copy_from_slice(&ip[12..16]);
    key.vip.addr[..4].copy_from_slice(&ip[16..20]);
    let h = flow_hash(&key);
    state(&key, h);
    let Some(mac) = FLOOR_RING.get(h % DEFAULT_RING_SIZE) else { return xdp_action::XDP_PASS };
    let Some(m) = ptr_mut_at::<[u8; 12]>(ctx, 0) else { return xdp_action::XDP_PASS };
    // SAFETY: bounds checked.
    let m = unsafe { &mut *m };
    m.copy_within(0..6, 6);
    m[..6].copy_from_slice(&mac[..6]);
    xdp_action::XDP_TX
}

#[inline(always)]
fn bump(i: u32) -> u64 {
    match BENCH_CNT.get_ptr_mut(i) {
        // SAFETY: per-CPU value, single writer per CPU.
        Some(c) => unsafe {
            *c += 1;
            *c
        },
        None => 0,
    }
}

/// Live-traffic generator (BPF_PROG_RUN with live frames on the generator's
/// veth): transmits `BENCH_KEEP` runs in 1024 (dropping the others, which
/// sets the offered rate), each with the next of `BENCH_FLOWS` source ports;
/// with `BENCH_FLOWS` 0, every frame is a new flow (source port and the
/// source address's low 16 bits count up together, the CPU in the top 4).
#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    let n = bump(0);
    // SAFETY: reads of load-time constants.
    let (flows, keep) =
        unsafe { (core::ptr::read_volatile(&BENCH_FLOWS) as u64, core::ptr::read_volatile(&BENCH_KEEP).clamp(1, 1024) as u64) };
    // Run n transmits when ⌊n·keep/1024⌋ steps: keep of every 1024, evenly.
    if (n.wrapping_mul(keep)) >> 10 == (n.wrapping_sub(1).wrapping_mul(keep)) >> 10 {
        return xdp_action::XDP_DROP;
    }
    let sent = bump(2);
    let Some(m) = ptr_mut_at::<[u8; 6]>(&ctx, 0) else { return xdp_action::XDP_DROP };
    // SAFETY: bounds checked; a read of a load-time constant.
    unsafe {
        let mac = core::ptr::read_volatile(&BENCH_DST_MAC);
        (*m).copy_from_slice(&mac[..6]);
    }
    let Some(p) = ptr_mut_at::<[u8; 2]>(&ctx, 14 + 20) else { return xdp_action::XDP_DROP };
    if flows == 0 {
        let Some(a) = ptr_mut_at::<[u8; 2]>(&ctx, 14 + 14) else { return xdp_action::XDP_DROP };
        // The count is per CPU, and a generator call may move between
        // CPUs: the CPU goes into the address's top 4 bits, so two CPUs
        // never send the same flow (unique for 2^28 frames per CPU).
        // SAFETY: helper without preconditions; bounds checked.
        unsafe {
            let cpu = bpf_get_smp_processor_id() as u64 & 0xf;
            *p = (sent as u16).to_be_bytes();
            *a = ((cpu << 12 | (sent >> 16) & 0xfff) as u16).to_be_bytes();
        }
        return xdp_action::XDP_TX;
    }
    let port = 1024 + (sent % flows) as u16;
    // SAFETY: bounds checked.
    unsafe { *p = port.to_be_bytes() };
    xdp_action::XDP_TX
}

/// Sink on the generator side: counts the IPv4 frames the balancer sent
/// back (not the veths' own IPv6 chatter) and drops everything.
#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    if let Some(t) = ptr_at::<[u8; 2]>(&ctx, 12) {
        // SAFETY: bounds checked.
        if unsafe { *t } == [0x08, 0x00] {
            bump(1);
        }
    }
    xdp_action::XDP_DROP
}

/// The program `new_flows` hands each frame to (slot 0): xlb, or a floor.
#[map(name = "FLOOR_NEXT")]
static FLOOR_NEXT: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// New flows at full speed: with BPF_PROG_TEST_RUN's repeat, every run sees
/// the frame as the previous run left it, so adding one to the source
/// address each run gives every run a new 5-tuple with warm caches (as a
/// NIC's batches do, unlike one syscall per frame), then the frame goes to
/// the program under test by tail call. Timing the same wrapper in front of
/// `floor_stateless_dsr` calibrates it out.
#[xdp]
pub fn new_flows(ctx: XdpContext) -> u32 {
    let Some(t) = ptr_at::<[u8; 2]>(&ctx, 12) else { return xdp_action::XDP_ABORTED };
    // SAFETY: bounds checked.
    let off = if unsafe { *t } == [0x86, 0xdd] { 14 + 8 + 12 } else { 14 + 12 };
    let Some(src) = ptr_mut_at::<[u8; 4]>(&ctx, off) else { return xdp_action::XDP_ABORTED };
    // SAFETY: bounds checked; the tail call does not return when it succeeds.
    unsafe {
        *src = u32::from_be_bytes(*src).wrapping_add(1).to_be_bytes();
        FLOOR_NEXT.tail_call(&ctx, 0);
    }
    xdp_action::XDP_ABORTED
}
