//! The one place that decides where a balanced packet goes: flows through
//! the connection table (the VIP and its algorithm only for new flows), IP
//! fragments by the VIP's 3-tuple hash, ICMP errors to the flow they are
//! about. Every path returns a `Choice`, and the VIP map is read here only.

use lb_common::{BackendInfo, FlowKey, Stat, StatBlock, VipInfo};

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
/// all, another `Stat` when it must be dropped.
#[inline(always)]
pub fn choose<'a>(pkt: &Packet, stats: &mut StatBlock) -> Result<Choice<'a>, Stat> {
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
                let vip = vip(key)?;
                p.settle(vip, stats);
                let (id, backend) = select::schedule(key, vip, stats)?;
                p.commit(id, backend, stats);
                Ok(Choice { id, backend, new_flow: true })
            }
        },
        Kind::Fragment => select::fragment(key, vip(key)?).map(Choice::old),
        Kind::IcmpError => {
            let vip = vip(key)?;
            match conntrack::peek(key, vip) {
                Some(c) => Ok(c),
                None => select::rehash(key, vip).map(Choice::old),
            }
        }
    }
}

/// The VIP a packet is for (fragments: their alias under port 0).
#[inline(always)]
fn vip<'a>(key: &FlowKey) -> Result<&'a VipInfo, Stat> {
    // SAFETY: map values are only read; the agent replaces entries whole.
    unsafe { VIPS.get(&key.vip) }.ok_or(Stat::PassNotVip)
}
