//! Backend MAC resolution from the kernel's neighbour table, over netlink.
//!
//! A backend without a configured MAC is looked up in the neighbour (ARP/NDP)
//! table of the balancer's interface. When there is no usable entry yet, the
//! agent makes the kernel resolve one by sending a single empty UDP datagram
//! to the backend's discard port (9), then looks again.

use anyhow::{anyhow, Context, Result};
use futures::TryStreamExt;
use netlink_packet_route::{
    link::LinkAttribute,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
};
use rtnetlink::{Handle, IpVersion};
use std::net::{IpAddr, SocketAddr, UdpSocket};

use crate::config::Mac;

/// A netlink handle bound to the balancer's interface.
#[derive(Clone)]
pub struct Resolver {
    handle: Handle,
    ifindex: u32,
}

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

impl Resolver {
    /// A resolver for one interface.
    pub fn new(handle: Handle, ifindex: u32) -> Resolver {
        Resolver { handle, ifindex }
    }

    /// The interface it resolves on.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The MAC of `ip` on the interface, if the table has a usable entry.
    pub async fn lookup(&self, ip: IpAddr) -> Result<Option<Mac>> {
        let version = if ip.is_ipv4() { IpVersion::V4 } else { IpVersion::V6 };
        let mut entries = self.handle.neighbours().get().set_family(version).execute();
        while let Some(n) = entries.try_next().await.context("neighbour table dump failed")? {
            if let Some(e) = decode(&n, self.ifindex).filter(|e| e.ip == ip && e.mac.is_some()) {
                return Ok(e.mac);
            }
        }
        Ok(None)
    }

    /// Look up, and if absent make the kernel resolve and look again.
    pub async fn resolve(&self, ip: IpAddr) -> Result<Option<Mac>> {
        if let Some(m) = self.lookup(ip).await? {
            return Ok(Some(m));
        }
        probe(ip);
        for _ in 0..5 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            if let Some(m) = self.lookup(ip).await? {
                return Ok(Some(m));
            }
        }
        Ok(None)
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

/// Subscribe to the kernel's neighbour changes (RTMGRP_NEIGH) and call
/// `apply` for each one on `ifindex`, until the subscription ends.
pub async fn watch(ifindex: u32, mut apply: impl FnMut(NeighbourEvent)) -> Result<()> {
    use futures::StreamExt;
    use netlink_packet_core::NetlinkPayload;
    use netlink_packet_route::RouteNetlinkMessage;
    use rtnetlink::sys::{AsyncSocket, SocketAddr as NlAddr};
    let (mut conn, _handle, mut messages) = rtnetlink::new_connection().context("cannot open a netlink socket")?;
    conn.socket_mut()
        .socket_mut()
        .bind(&NlAddr::new(0, rtnetlink::constants::RTMGRP_NEIGH))
        .context("cannot subscribe to neighbour changes")?;
    tokio::spawn(conn);
    while let Some((msg, _)) = messages.next().await {
        let n = match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) => n,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(n)) => {
                if let Some(mut e) = decode(&n, ifindex) {
                    e.mac = None;
                    apply(e);
                }
                continue;
            }
            _ => continue,
        };
        if let Some(e) = decode(&n, ifindex) {
            apply(e);
        }
    }
    Ok(())
}
