//! Backend MAC resolution from the kernel's neighbour table, over netlink.
//!
//! A backend without a configured MAC takes it from the agent's copy of the
//! neighbour (ARP/NDP) table of the balancer's interface (`NeighCache`): one
//! netlink subscription to neighbour events, plus one dump at start and
//! after an overrun; never a dump per backend or per check. When there is no
//! usable entry yet, the agent makes the kernel resolve one by sending a
//! single empty UDP datagram to the address's discard port (9), once per
//! address per interval; the answer arrives as an event.

use anyhow::{anyhow, Context, Result};
use futures::TryStreamExt;
use netlink_packet_route::{
    link::LinkAttribute,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
};
use rtnetlink::{Handle, IpVersion};
use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use crate::config::Mac;

/// Open a netlink connection (the connection task runs on the current runtime).
pub fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().context("cannot open a netlink socket")?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Index and MAC of a network interface.
pub async fn link(handle: &Handle, name: &str) -> Result<(u32, Mac)> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    let msg = links
        .try_next()
        .await
        .map_err(|e| anyhow!("interface {name} not found ({e})"))?
        .ok_or_else(|| anyhow!("interface {name} not found"))?;
    let mac = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(b) if b.len() == 6 => Some(Mac([b[0], b[1], b[2], b[3], b[4], b[5]])),
            _ => None,
        })
        .ok_or_else(|| anyhow!("interface {name} has no Ethernet address"))?;
    Ok((msg.header.index, mac))
}

/// The agent's copy of the kernel's neighbour table for its interface,
/// keyed by (ifindex, address): filled by one dump at start (and after an
/// overrun of the subscription) and kept current by neighbour events. It
/// also rations probes: an address is probed at most once per interval,
/// whatever number of VIPs use it.
#[derive(Debug, Default)]
pub struct NeighCache {
    ifindex: u32,
    macs: HashMap<(u32, IpAddr), Mac>,
    probed: HashMap<IpAddr, Instant>,
    refresh: BTreeSet<IpAddr>,
    /// Full dumps read (start and overruns).
    pub dumps: u64,
    /// Events applied.
    pub events: u64,
    /// Probes sent.
    pub probes: u64,
}

impl NeighCache {
    /// The interface the cache follows.
    pub fn set_ifindex(&mut self, ifindex: u32) {
        self.ifindex = ifindex;
    }

    /// The MAC of `ip`, if the kernel has a usable entry.
    pub fn get(&self, ip: IpAddr) -> Option<Mac> {
        self.macs.get(&(self.ifindex, ip)).copied()
    }

    /// One change: a usable entry, or `None` (gone, failed, incomplete),
    /// after which the address is probed again.
    pub fn update(&mut self, ip: IpAddr, mac: Option<Mac>) {
        self.events += 1;
        match mac {
            Some(m) => {
                self.macs.insert((self.ifindex, ip), m);
                self.refresh.remove(&ip);
            }
            None => {
                if self.macs.remove(&(self.ifindex, ip)).is_some() {
                    self.refresh.insert(ip);
                }
            }
        }
    }

    /// A full dump: the cache becomes exactly it.
    pub fn replace(&mut self, entries: &[(IpAddr, Mac)]) {
        self.dumps += 1;
        let ifindex = self.ifindex;
        self.macs.retain(|(i, _), _| *i != ifindex);
        for &(ip, m) in entries {
            self.macs.insert((ifindex, ip), m);
        }
    }

    /// Addresses whose entry vanished since the last call.
    pub fn take_refresh(&mut self) -> BTreeSet<IpAddr> {
        std::mem::take(&mut self.refresh)
    }

    /// Whether `ip` may be probed at `now` (and if so, records it).
    pub fn probe_due(&mut self, ip: IpAddr, now: Instant, every: Duration) -> bool {
        match self.probed.get(&ip) {
            Some(t) if now.saturating_duration_since(*t) < every => false,
            _ => {
                self.probed.insert(ip, now);
                self.probes += 1;
                true
            }
        }
    }
}

/// Make the kernel resolve `ip`'s link-layer address: one empty datagram to
/// the discard port.
pub fn probe(ip: IpAddr) {
    let bind: SocketAddr = if ip.is_ipv4() { "0.0.0.0:0".parse() } else { "[::]:0".parse() }.expect("literal");
    if let Ok(s) = UdpSocket::bind(bind) {
        let _ = s.send_to(&[], SocketAddr::new(ip, 9));
    }
}

/// A neighbour-table change on the balancer's interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeighbourEvent {
    /// The neighbour's address.
    pub ip: IpAddr,
    /// Its link-layer address, when the entry is usable.
    pub mac: Option<Mac>,
}

/// Decode a neighbour message for `ifindex` (None when it is for another
/// interface or carries no address).
fn decode(n: &netlink_packet_route::neighbour::NeighbourMessage, ifindex: u32) -> Option<NeighbourEvent> {
    if n.header.ifindex != ifindex {
        return None;
    }
    let mut ip = None;
    let mut mac = None;
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => ip = Some(IpAddr::V4(*v4)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => ip = Some(IpAddr::V6(*v6)),
            NeighbourAttribute::LinkLocalAddress(b) if b.len() == 6 => mac = Some(Mac([b[0], b[1], b[2], b[3], b[4], b[5]])),
            _ => {}
        }
    }
    let usable = !matches!(n.header.state, NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None);
    Some(NeighbourEvent { ip: ip?, mac: mac.filter(|_| usable) })
}

/// What the neighbour watcher reports.
#[derive(Debug, Clone)]
pub enum NeighUpdate {
    /// The whole table of the interface (at start, and after an overrun).
    Dump(Vec<(IpAddr, Mac)>),
    /// One change.
    Change(NeighbourEvent),
}

/// Size of the subscription's receive buffer: room for bursts of events.
const RX_BUFFER: usize = 4 << 20;

/// The interface's usable neighbour entries, in one dump per family.
async fn dump(handle: &Handle, ifindex: u32) -> Result<Vec<(IpAddr, Mac)>> {
    let mut out = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let mut entries = handle.neighbours().get().set_family(version).execute();
        while let Some(n) = entries.try_next().await.context("neighbour table dump failed")? {
            if let Some(NeighbourEvent { ip, mac: Some(mac) }) = decode(&n, ifindex) {
                out.push((ip, mac));
            }
        }
    }
    Ok(out)
}

/// Subscribe to the kernel's neighbour changes (RTMGRP_NEIGH), then dump the
/// table once, and call `apply` with the dump and with each change on
/// `ifindex`, until the subscription ends. When the subscription overruns
/// (events lost: ENOBUFS), the table is dumped again.
pub async fn watch(ifindex: u32, mut apply: impl FnMut(NeighUpdate)) -> Result<()> {
    use futures::StreamExt;
    use netlink_packet_core::NetlinkPayload;
    use netlink_packet_route::RouteNetlinkMessage;
    use rtnetlink::sys::{AsyncSocket, SocketAddr as NlAddr};
    let (mut conn, _handle, mut messages) = rtnetlink::new_connection().context("cannot open a netlink socket")?;
    let sock = conn.socket_mut().socket_mut();
    if let Err(e) = sock.set_rx_buf_sz(RX_BUFFER) {
        log::debug!("cannot enlarge the neighbour subscription's buffer: {e}");
    }
    sock.bind(&NlAddr::new(0, rtnetlink::constants::RTMGRP_NEIGH)).context("cannot subscribe to neighbour changes")?;
    tokio::spawn(conn);
    let dumper = connect()?;
    apply(NeighUpdate::Dump(dump(&dumper, ifindex).await?));
    while let Some((msg, _)) = messages.next().await {
        match msg.payload {
            NetlinkPayload::Overrun(_) => {
                log::warn!("neighbour events were lost (subscription overran); reading the neighbour table again");
                apply(NeighUpdate::Dump(dump(&dumper, ifindex).await?));
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) => {
                if let Some(e) = decode(&n, ifindex) {
                    apply(NeighUpdate::Change(e));
                }
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(n)) => {
                if let Some(mut e) = decode(&n, ifindex) {
                    e.mac = None;
                    apply(NeighUpdate::Change(e));
                }
            }
            _ => {}
        }
    }
    Ok(())
}
