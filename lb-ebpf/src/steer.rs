//! The one place that decides where a balanced packet goes: flows through
//! the connection table (the VIP and its algorithm only for new flows), IP
//! fragments by the VIP's 3-tuple hash, ICMP errors to the flow they are
//! about. Every path returns a `Choice`, and the VIP map is read here only.

use lb_common::{BackendInfo, FlowKey, Stat, StatBlock, VipInfo, VipKey, VIP_FILTER_ANY_PORT};

use crate::{
    conntrack::{self, Track},
    maps::VIPS,
    parse::{Kind, Packet},
    select,
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

/// Where `pkt` goes; `PassNotVip` when its destination is not a VIP after
/// all, another `Stat` when it must be dropped. `filter` is the address's
/// pre-filter value (it says whether an any-port VIP may match).
#[inline(always)]
pub fn choose<'a>(pkt: &Packet, filter: u32, stats: &mut StatBlock) -> Result<Choice<'a>, Stat> {
    let key = &pkt.key;
    // Port 0 is where fragments of a VIP address are looked up; no VIP has
    // it, so a TCP/UDP packet (or an ICMP error about one) to port 0 is not
    // VIP traffic.
    if key.vip.is_fragment_alias() && pkt.kind != Kind::Fragment {
        return Err(Stat::PassNotVip);
    }
    match pkt.kind {
        Kind::Flow => match conntrack::track(key, pkt.tcp_flags, stats) {
            Track::Hit(c) => Ok(c),
            Track::New(p) => {
                let vip = vip(key, filter)?;
                p.settle(vip, stats);
                let (id, backend) = select::schedule(key, vip, stats)?;
                p.commit(key, id, backend, stats);
                Ok(Choice { id, backend, new_flow: true })
            }
        },
        Kind::Fragment => select::fragment(key, vip(key, filter)?).map(Choice::old),
        Kind::IcmpError => {
            let vip = vip(key, filter)?;
            match conntrack::peek(key, vip) {
                Some(c) => Ok(c),
                None => select::rehash(key, vip).map(Choice::old),
            }
        }
        // Answered before steering (`answer_ping`).
        Kind::Echo { .. } => Err(Stat::PassOtherL4),
    }
}

/// The VIP a packet is for (fragments: their alias under port 0): the
/// exact entry, else the address's any-port VIP, looked up only where the
/// pre-filter says one exists (an exact VIP of the port always wins).
#[inline(always)]
fn vip<'a>(key: &FlowKey, filter: u32) -> Result<&'a VipInfo, Stat> {
    // SAFETY: map values are only read; the agent replaces entries whole.
    if let Some(v) = unsafe { VIPS.get(&key.vip) } {
        return Ok(v);
    }
    if filter & VIP_FILTER_ANY_PORT != 0 {
        // SAFETY: as above.
        if let Some(v) = unsafe { VIPS.get(&key.vip.any_port()) } {
            return Ok(v);
        }
    }
    Err(Stat::PassNotVip)
}

/// Whether the address of an echo request (its key: `VipKey::echo`) has
/// an echo entry that answers.
#[inline(always)]
pub fn answers_ping(echo: &VipKey) -> bool {
    // SAFETY: as above.
    unsafe { VIPS.get(echo) }.is_some_and(|v| v.answers_ping())
}
