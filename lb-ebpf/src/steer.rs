//! The one place that decides where a balanced packet goes: flows through
//! the connection table (the VIP and its algorithm only for new flows), IP
//! fragments by the VIP's 3-tuple hash, ICMP errors to the flow they are
//! about. Every path returns a `Choice`, and the VIP map is read here only.

use aya_ebpf::{maps::lpm_trie::Key, programs::XdpContext};
use lb_common::{BackendInfo, FlowKey, PrefixKey, Stat, StatBlock, VipInfo, VipKey, KEY_ANY_PORT, VIP_FILTER_ANY_PORT};

use crate::{
    conntrack::{self, Track},
    maps::{PREFIX_ON, VIPS, VIP_PREFIX},
    parse::{Kind, Packet},
    quic, select,
};

/// The backend chosen for a packet.
pub struct Choice<'a> {
    /// Backend id (index into `XLB_BACKENDS`).
    pub id: u32,
    /// Its forwarding entry.
    pub backend: &'a BackendInfo,
    /// True when the packet started a new table entry.
    pub new_flow: bool,
}

impl<'a> Choice<'a> {
    #[inline(always)]
    fn old((id, backend): (u32, &'a BackendInfo)) -> Choice<'a> {
        Choice { id, backend, new_flow: false }
    }
}

/// What the pre-filter stage learnt about a packet's destination.
#[derive(Clone, Copy)]
pub struct Gate<'a> {
    /// The address's pre-filter value (non-zero: some exact VIP address
    /// folds there; `VIP_FILTER_ANY_PORT`: an any-port VIP may match).
    pub filter: u32,
    /// The prefix VIP found for an address no exact VIP has (the trie was
    /// read before the connection table, so non-VIP traffic skips it).
    pub prefix: Option<&'a VipInfo>,
}

impl<'a> Gate<'a> {
    /// The gate of a packet: `None` when it is certainly not VIP traffic.
    /// Costs one array read, plus one more when the filter misses (is
    /// there any prefix VIP?) and a trie lookup only when there is one.
    #[inline(always)]
    pub fn open(key: &FlowKey, filter: u32) -> Option<Gate<'a>> {
        if filter != 0 {
            return Some(Gate { filter, prefix: None });
        }
        if !prefixes_on() {
            return None;
        }
        prefix_vip(&key.vip).map(|v| Gate { filter, prefix: Some(v) })
    }
}

/// Whether any prefix VIP is configured (`XLB_PREFIX_ON`).
#[inline(always)]
fn prefixes_on() -> bool {
    PREFIX_ON.get(0).is_some_and(|n| *n != 0)
}

/// The most specific prefix VIP for a destination: with its port first,
/// then the any-port one (unless the key is a fragment alias or echo key,
/// port 0, whose entries are exact).
#[inline(always)]
fn prefix_vip<'a>(k: &VipKey) -> Option<&'a VipInfo> {
    let bits = if k.family == lb_common::FAMILY_V6 { 128 } else { 32 };
    let mut key = Key::new(PrefixKey::bits(bits), PrefixKey::of(k));
    if let Some(v) = VIP_PREFIX.get(&key) {
        return Some(v);
    }
    if k.port_be == 0 {
        return None;
    }
    key.data.port_be = 0;
    key.data.family |= KEY_ANY_PORT;
    VIP_PREFIX.get(&key)
}

/// Where `pkt` goes; `PassNotVip` when its destination is not a VIP after
/// all, another `Stat` when it must be dropped.
#[inline(always)]
pub fn choose<'a>(ctx: &XdpContext, pkt: &Packet, gate: Gate<'a>, stats: &mut StatBlock) -> Result<Choice<'a>, Stat> {
    let key = &pkt.key;
    // Port 0 is where fragments of a VIP address are looked up; no VIP has
    // it, so a TCP/UDP packet (or an ICMP error about one) to port 0 is not
    // VIP traffic.
    if key.vip.is_fragment_alias() && pkt.kind != Kind::Fragment {
        return Err(Stat::PassNotVip);
    }
    match pkt.kind {
        // The VIP and the algorithm before the new entry's accounting: a
        // pure SYN's set is read only then (see `conntrack::track`).
        Kind::Flow => match conntrack::track(key, pkt.tcp_flags, stats) {
            Track::Hit(id, backend) => Ok(Choice::old((id, backend))),
            Track::New(mut p) => {
                let vip = vip(key, gate)?;
                // `--quic`: the server ID in the connection ID first (a
                // client that moved to a new address or port misses the
                // table and is sent back to its backend here).
                let (id, backend) = match quic::backend(ctx, pkt, vip, stats) {
                    Some(c) => c,
                    None => select::schedule(key, vip, stats)?,
                };
                p.settle(vip, stats);
                p.commit(key, id, backend, stats);
                Ok(Choice { id, backend, new_flow: true })
            }
        },
        Kind::Fragment => select::fragment(key, vip(key, gate)?).map(Choice::old),
        Kind::IcmpError => {
            let vip = vip(key, gate)?;
            match conntrack::peek(key, vip) {
                Some(c) => Ok(Choice::old(c)),
                None => select::rehash(key, vip).map(Choice::old),
            }
        }
        // Answered before steering (`answer_ping`).
        Kind::Echo { .. } => Err(Stat::PassOtherL4),
    }
}

/// The VIP a packet is for (fragments: their alias under port 0): the
/// exact entry, else the address's any-port VIP (looked up only where the
/// pre-filter says one exists), else the most specific prefix VIP (only
/// when there are any). An exact VIP always wins over a prefix.
#[inline(always)]
fn vip<'a>(key: &FlowKey, gate: Gate<'a>) -> Result<&'a VipInfo, Stat> {
    if let Some(v) = gate.prefix {
        return Ok(v);
    }
    // SAFETY: map values are only read; the agent replaces entries whole.
    if let Some(v) = unsafe { VIPS.get(&key.vip) } {
        return Ok(v);
    }
    if gate.filter & VIP_FILTER_ANY_PORT != 0 {
        // SAFETY: as above.
        if let Some(v) = unsafe { VIPS.get(&key.vip.any_port()) } {
            return Ok(v);
        }
    }
    if prefixes_on() {
        if let Some(v) = prefix_vip(&key.vip) {
            return Ok(v);
        }
    }
    Err(Stat::PassNotVip)
}

/// Whether the address of an echo request (its key: `VipKey::echo`) has
/// an echo entry that answers (exact address, else prefix).
#[inline(always)]
pub fn answers_ping(echo: &VipKey, gate: Gate) -> bool {
    let v = match gate.prefix {
        Some(v) => Some(v),
        // SAFETY: as above.
        None => unsafe { VIPS.get(echo) }.or_else(|| if prefixes_on() { prefix_vip(echo) } else { None }),
    };
    v.is_some_and(|v| v.answers_ping())
}
