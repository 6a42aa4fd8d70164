//! Connection-table sync between balancers (`--sync-peer`, `--sync-key`):
//! the flows Maglev cannot save on another node.
//!
//! With the same config and health every node builds the same table, so a
//! flow that fails over to a peer lands on the backend the table gives it —
//! the backend it is on, unless the table changed since the flow started
//! (a backend added, a weight changed): then only this node's connection
//! table keeps it where it is. After each table change and every
//! `INTERVAL`, the agent sends its peers exactly those entries (backend
//! differs from what the current table would choose) as 5-tuple → backend
//! address; a peer maps the address to its own backend id and generation
//! and inserts the entry into its table, so the flow stays put if it fails
//! over there. Unicast UDP, HMAC-SHA256 with a shared key (`wire`).
//!
//! Nothing here runs per packet: the sender walks the table (with the flow
//! keys `--flow-keys` keeps beside it, which sync turns on) from userspace,
//! and the receiver writes entries as the datapath does.

use anyhow::{bail, Context, Result};
use lb_common::{
    ct::{ct_now, CT_TIME_SHIFT},
    hash::{flow_hash, src_hash},
    Algo, CtEntry, CtWay, FlowKey, VipKey,
};
use serde::{Deserialize, Serialize};
use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use crate::{
    agent::{Agent, Maps},
    conntrack::{CtView, Inserted, KeysView},
};

pub mod wire;
pub use crate::config::sync::{SyncPeer, SyncSettings, DEFAULT_PORT};
pub use wire::SyncEntry;

/// Every entry that differs is sent again this often (lost datagrams,
/// restarted peers), besides after each table change.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// How often the sender looks for a table change.
const POLL: Duration = Duration::from_millis(100);
/// Entries not seen for this long are not sent.
pub const MAX_AGE: Duration = Duration::from_secs(300);
/// Datagrams sent per burst, and the pause after each: at most 1000
/// datagrams (about 60 000 IPv4 entries) per second to each peer.
const BURST: usize = 100;
const BURST_GAP: Duration = Duration::from_millis(100);

/// Read the shared key: the file's bytes (a trailing newline dropped), at
/// least `wire::MIN_KEY` of them, in a file only its owner may read.
pub fn load_key(path: &Path) -> Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read the sync key {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!("sync key {} is open to group or others (mode {mode:03o}): chmod 600 it", path.display());
    }
    let mut key = std::fs::read(path).with_context(|| format!("cannot read the sync key {}", path.display()))?;
    while key.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        key.pop();
    }
    if key.len() < wire::MIN_KEY {
        bail!("sync key {} is {} bytes: at least {} (e.g. `head -c 32 /dev/urandom | base64 > KEY`)", path.display(), key.len(), wire::MIN_KEY);
    }
    Ok(key)
}

/// Sync counters (`xlb stats`, status, metrics).
#[derive(Default, Debug)]
pub struct Counters {
    rounds: AtomicU64,
    sent_datagrams: AtomicU64,
    sent_entries: AtomicU64,
    send_errors: AtomicU64,
    received_datagrams: AtomicU64,
    received_entries: AtomicU64,
    inserted: AtomicU64,
    unchanged: AtomicU64,
    kept_newer: AtomicU64,
    unknown_backend: AtomicU64,
    dropped_unauthenticated: AtomicU64,
    dropped_stale: AtomicU64,
    dropped_malformed: AtomicU64,
    last_round_entries: AtomicU64,
}

/// What the sync has done since the agent started.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Peers entries go to.
    pub peers: Vec<String>,
    /// Walks of the table that sent what differs.
    pub rounds: u64,
    /// Datagrams sent (to all peers).
    pub sent_datagrams: u64,
    /// Entries sent (to all peers).
    pub sent_entries: u64,
    /// Datagrams the kernel refused to send.
    pub send_errors: u64,
    /// Datagrams received and accepted.
    pub received_datagrams: u64,
    /// Entries in them.
    pub received_entries: u64,
    /// Entries written into the connection table.
    pub inserted: u64,
    /// Entries already there with the same backend.
    pub unchanged: u64,
    /// Entries not taken: this node saw the flow more recently, on
    /// another backend (a 5-tuple reused since, here).
    #[serde(default)]
    pub kept_newer: u64,
    /// Entries for a VIP or backend address this node does not have: skipped.
    pub unknown_backend: u64,
    /// Datagrams whose HMAC did not verify with our key: dropped.
    pub dropped_unauthenticated: u64,
    /// Replayed or out-of-window datagrams: dropped.
    pub dropped_stale: u64,
    /// Datagrams that do not parse: dropped.
    pub dropped_malformed: u64,
    /// Entries that differed from the table at the last round.
    pub last_round_entries: u64,
}

impl Counters {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// A snapshot for the status.
    pub fn stats(&self, peers: &[SyncPeer]) -> SyncStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SyncStats {
            peers: peers.iter().map(|p| p.to_string()).collect(),
            rounds: g(&self.rounds),
            sent_datagrams: g(&self.sent_datagrams),
            sent_entries: g(&self.sent_entries),
            send_errors: g(&self.send_errors),
            received_datagrams: g(&self.received_datagrams),
            received_entries: g(&self.received_entries),
            inserted: g(&self.inserted),
            unchanged: g(&self.unchanged),
            kept_newer: g(&self.kept_newer),
            unknown_backend: g(&self.unknown_backend),
            dropped_unauthenticated: g(&self.dropped_unauthenticated),
            dropped_stale: g(&self.dropped_stale),
            dropped_malformed: g(&self.dropped_malformed),
            last_round_entries: g(&self.last_round_entries),
        }
    }
}

impl SyncStats {
    /// Counters by name (metrics).
    pub fn named(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("rounds", self.rounds),
            ("sent_datagrams", self.sent_datagrams),
            ("sent_entries", self.sent_entries),
            ("send_errors", self.send_errors),
            ("received_datagrams", self.received_datagrams),
            ("received_entries", self.received_entries),
            ("inserted", self.inserted),
            ("unchanged", self.unchanged),
            ("kept_newer", self.kept_newer),
            ("unknown_backend", self.unknown_backend),
            ("dropped_unauthenticated", self.dropped_unauthenticated),
            ("dropped_stale", self.dropped_stale),
            ("dropped_malformed", self.dropped_malformed),
        ]
    }

    /// One line for `xlb stats`.
    pub fn line(&self) -> String {
        format!(
            "sync to {}: sent {} entries in {} datagrams ({} errors), received {} entries in {} datagrams ({} inserted, {} already there, {} kept newer, {} unknown backend); dropped {} unauthenticated, {} stale, {} malformed",
            self.peers.join(", "),
            self.sent_entries,
            self.sent_datagrams,
            self.send_errors,
            self.received_entries,
            self.received_datagrams,
            self.inserted,
            self.unchanged,
            self.kept_newer,
            self.unknown_backend,
            self.dropped_unauthenticated,
            self.dropped_stale,
            self.dropped_malformed
        )
    }
}

/// One VIP's published table and its backends, as the sync needs them.
#[derive(Debug, Clone)]
struct VipTable {
    algo: Algo,
    table: Vec<u32>,
    /// Live backends by (id, generation): what a sent entry may name.
    alive: HashMap<(u32, u16), IpAddr>,
    /// Every backend by address: what a received entry maps to.
    by_ip: HashMap<IpAddr, (u32, u16)>,
}

/// The agent's published tables, taken under its lock and used without it.
#[derive(Debug, Clone, Default)]
pub struct Tables {
    vips: HashMap<VipKey, VipTable>,
}

impl Tables {
    /// The agent's tables now.
    pub fn of<M: Maps>(agent: &Agent<M>) -> Tables {
        let vips = agent
            .vips()
            .iter()
            .map(|(v, s)| {
                let t = VipTable {
                    algo: s.algo,
                    table: s.table.clone(),
                    alive: s.backends.values().filter(|b| b.alive()).map(|b| ((b.id, b.gen), b.ip)).collect(),
                    by_ip: s.backends.values().map(|b| (b.ip, (b.id, b.gen))).collect(),
                };
                (v.key(), t)
            })
            .collect();
        Tables { vips }
    }

    /// The backend id the VIP's table gives a new flow, when the table
    /// alone decides (Maglev, source-hash); `None` for the algorithms that
    /// depend on more (rr, wrr, random, least-conn): every entry of those
    /// differs as far as a peer can tell.
    fn predicted(t: &VipTable, key: &FlowKey) -> Option<u32> {
        let h = match t.algo {
            Algo::Maglev => flow_hash(key),
            Algo::SourceHash => src_hash(key),
            _ => return None,
        };
        (!t.table.is_empty()).then(|| t.table[h as usize % t.table.len()])
    }

    /// The open entries (`(key, entry, age in table time units)`) whose
    /// backend is live and differs from what the table would choose.
    pub fn differing(&self, entries: impl IntoIterator<Item = (FlowKey, CtEntry, u64)>) -> Vec<SyncEntry> {
        let max_age = (MAX_AGE.as_nanos() >> CT_TIME_SHIFT) as u64;
        entries
            .into_iter()
            .filter(|(_, e, age)| !e.closed && *age <= max_age)
            .filter_map(|(key, e, age)| {
                let t = self.vips.get(&key.vip)?;
                let ip = *t.alive.get(&(e.backend_id, e.gen))?;
                let idle = u16::try_from(age).unwrap_or(u16::MAX);
                (Self::predicted(t, &key) != Some(e.backend_id)).then_some(SyncEntry { key, backend: ip, idle })
            })
            .collect()
    }

    /// This node's (id, generation) for a received entry, if it has the
    /// VIP and a backend of that address.
    pub fn resolve(&self, e: &SyncEntry) -> Option<(u32, u16)> {
        let t = self.vips.get(&e.key.vip)?;
        if !wire::same_family(&e.key.vip, e.backend) {
            return None;
        }
        t.by_ip.get(&e.backend).copied()
    }
}

/// Every entry of the table whose key is known, with its age.
pub fn keyed_entries(view: &CtView, keys: &KeysView, seed: &lb_common::CtSeed) -> Vec<(FlowKey, CtEntry, u64)> {
    let now = ct_now(crate::conntrack::datapath_now_ns());
    let mut out = Vec::new();
    crate::conntrack::for_each_keyed(view, keys, seed, |key, way| {
        out.push((key, CtWay::entry(way.tag, way.val), CtWay::age(way.tag, now)));
    });
    out
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A running sync: its settings, key and counters.
pub struct Syncer {
    /// Peers.
    pub peers: Vec<SyncPeer>,
    key: Vec<u8>,
    /// Counters.
    pub counters: Counters,
}

impl fmt::Debug for Syncer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Syncer").field("peers", &self.peers).field("key", &"<secret>").finish()
    }
}

impl Syncer {
    /// Read the key and check the settings (one-line errors).
    pub fn new(s: &SyncSettings) -> Result<Syncer> {
        s.validate()?;
        Ok(Syncer { peers: s.peers.clone(), key: load_key(&s.key_file)?, counters: Counters::default() })
    }

    /// Status snapshot.
    pub fn stats(&self) -> SyncStats {
        self.counters.stats(&self.peers)
    }

    /// Verify a datagram and insert its entries (skipping unknown backends).
    pub fn receive(&self, d: &[u8], replay: &mut wire::Replay, tables: &Tables, ins: &mut Inserter) {
        let c = &self.counters;
        let g = match wire::decode(&self.key, d).and_then(|g| replay.accept(&g, now_ms()).map(|_| g)) {
            Ok(g) => g,
            Err(r) => {
                Counters::add(
                    match r {
                        wire::Refused::Malformed => &c.dropped_malformed,
                        wire::Refused::Unauthenticated => &c.dropped_unauthenticated,
                        wire::Refused::Stale => &c.dropped_stale,
                    },
                    1,
                );
                return;
            }
        };
        Counters::add(&c.received_datagrams, 1);
        Counters::add(&c.received_entries, g.entries.len() as u64);
        for e in &g.entries {
            match tables.resolve(e) {
                None => Counters::add(&c.unknown_backend, 1),
                Some((id, gen)) => match ins.view.insert_keyed(&ins.seed, &e.key, id, gen, e.idle as u64, Some(&mut ins.keys)) {
                    Inserted::Unchanged => Counters::add(&c.unchanged, 1),
                    Inserted::KeptNewer => Counters::add(&c.kept_newer, 1),
                    _ => Counters::add(&c.inserted, 1),
                },
            }
        }
    }
}

/// The connection table and its keys mapped writable, for received entries.
pub struct Inserter {
    view: CtView,
    keys: KeysView,
    seed: lb_common::CtSeed,
}

impl Inserter {
    /// Map `dp`'s table and flow keys writable (needs `--flow-keys`).
    pub fn new(dp: &crate::maps::Datapath) -> Result<Inserter> {
        if !dp.opts.flow_keys {
            bail!("the sync needs the flow keys (--flow-keys)");
        }
        let keys = KeysView::map(dp.flow_keys_map(), dp.opts.flow_key_slots(), true)?;
        Ok(Inserter { view: dp.conntrack_view()?, keys, seed: dp.conntrack_seed() })
    }
}

/// The table and its keys mapped read-only, for the sender's walks.
struct Reader {
    view: CtView,
    keys: KeysView,
    seed: lb_common::CtSeed,
}

/// Bind the sync socket: `listen`, or every address on `DEFAULT_PORT`
/// (IPv6 and IPv4, or IPv4 alone where IPv6 is off).
pub async fn bind(listen: Option<SocketAddr>) -> Result<tokio::net::UdpSocket> {
    if let Some(l) = listen {
        return tokio::net::UdpSocket::bind(l).await.with_context(|| format!("cannot listen for sync on {l}"));
    }
    let any6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), DEFAULT_PORT);
    match tokio::net::UdpSocket::bind(any6).await {
        Ok(s) => Ok(s),
        Err(_) => {
            let any4 = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), DEFAULT_PORT);
            tokio::net::UdpSocket::bind(any4).await.with_context(|| format!("cannot listen for sync on port {DEFAULT_PORT}"))
        }
    }
}

/// A peer's address as the socket needs it (IPv4 peers through an IPv6
/// socket as mapped addresses).
fn target(sock: &tokio::net::UdpSocket, p: SyncPeer) -> SocketAddr {
    match (sock.local_addr().map(|a| a.is_ipv6()), p.0) {
        (Ok(true), SocketAddr::V4(v4)) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
        _ => p.0,
    }
}

/// Run the sync until the task is dropped: receive on `sock`, and send
/// what differs after each table change and every `INTERVAL`.
pub async fn run(agent: Arc<Mutex<Agent>>, sync: Arc<Syncer>, sock: tokio::net::UdpSocket) {
    let maps = agent.lock().map_err(|_| anyhow::anyhow!("agent lock poisoned")).and_then(|a| {
        let dp = &a.dp;
        let slots = dp.opts.flow_key_slots();
        let seed = dp.conntrack_seed();
        let reader = Reader { view: dp.conntrack_reader()?.into_view(), keys: KeysView::map(dp.flow_keys_map(), slots, false)?, seed };
        let ins = Inserter::new(dp)?;
        Ok((reader, ins))
    });
    let (reader, ins) = match maps {
        Ok(m) => m,
        Err(e) => {
            log::error!("connection-table sync off: {e:#}");
            return;
        }
    };
    let sock = Arc::new(sock);
    // One task: dropping it ends both loops (and their hold on the agent).
    tokio::select! {
        _ = receive_loop(agent.clone(), sync.clone(), sock.clone(), ins) => {}
        _ = send_loop(agent, sync, sock, Arc::new(reader)) => {}
    }
}

async fn receive_loop(agent: Arc<Mutex<Agent>>, sync: Arc<Syncer>, sock: Arc<tokio::net::UdpSocket>, mut ins: Inserter) {
    let mut buf = vec![0u8; 65_536];
    let mut replay = wire::Replay::default();
    let mut tables: Option<(u64, Tables)> = None;
    loop {
        let Ok((n, _from)) = sock.recv_from(&mut buf).await else { continue };
        // The tables are taken again only when the agent published since.
        let Ok(a) = agent.lock() else { return };
        if tables.as_ref().is_none_or(|(p, _)| *p != a.publications) {
            tables = Some((a.publications, Tables::of(&a)));
        }
        drop(a);
        if let Some((_, t)) = &tables {
            sync.receive(&buf[..n], &mut replay, t, &mut ins);
        }
    }
}

async fn send_loop(agent: Arc<Mutex<Agent>>, sync: Arc<Syncer>, sock: Arc<tokio::net::UdpSocket>, reader: Arc<Reader>) {
    let sender = crate::conntrack::random_seed().map(|s| s.k[0]).unwrap_or_else(|_| now_ms());
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(u64, Instant)> = None;
    let targets: Vec<SocketAddr> = sync.peers.iter().map(|p| target(&sock, *p)).collect();
    let c = &sync.counters;
    loop {
        tick.tick().await;
        let tables = {
            let Ok(a) = agent.lock() else { return };
            if last.is_some_and(|(p, t)| p == a.publications && t.elapsed() < INTERVAL) {
                continue;
            }
            last = Some((a.publications, Instant::now()));
            Tables::of(&a)
        };
        let r = reader.clone();
        let Ok(entries) = tokio::task::spawn_blocking(move || tables.differing(keyed_entries(&r.view, &r.keys, &r.seed))).await else {
            return;
        };
        Counters::add(&c.rounds, 1);
        c.last_round_entries.store(entries.len() as u64, Ordering::Relaxed);
        let datagrams = wire::encode(&sync.key, sender, &mut seq, now_ms(), &entries);
        for (i, d) in datagrams.iter().enumerate() {
            for t in &targets {
                match sock.send_to(d, t).await {
                    Ok(_) => Counters::add(&c.sent_datagrams, 1),
                    Err(e) => {
                        if c.send_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            log::warn!("sync: cannot send to {t}: {e}");
                        }
                    }
                }
            }
            if (i + 1) % BURST == 0 {
                tokio::time::sleep(BURST_GAP).await;
            }
        }
        Counters::add(&c.sent_entries, entries.len() as u64 * targets.len() as u64);
    }
}

#[cfg(test)]
mod tests;
