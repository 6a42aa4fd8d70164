//! What `xlb explain` answers (JSON) and how the CLI prints it.

use super::*;

/// A backend as shown: its id and, when the agent knows it, address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRef {
    /// Datapath id.
    pub id: u32,
    /// Address (None: the id belongs to no backend the agent knows).
    pub ip: Option<String>,
    /// Its generation now.
    pub generation: u16,
    /// May carry traffic now.
    pub alive: bool,
}

/// The flow's connection-table entry, as shown.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EntryShown {
    /// Way of the set.
    pub way: usize,
    /// Backend it names.
    pub backend: BackendRef,
    /// Generation recorded in the entry.
    pub generation: u16,
    /// Milliseconds since the flow was last seen.
    pub age_ms: u64,
    /// Closed by FIN/RST.
    pub closed: bool,
}

/// The client's persistence entry, as shown.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PersistShown {
    /// Backend it names.
    pub backend: BackendRef,
    /// Seconds left (negative: lapsed).
    pub remaining_s: i64,
}

/// Everything `xlb explain` says about one flow.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Explanation {
    /// The flow's destination, `ADDR:PORT/PROTO`.
    pub vip: String,
    /// The VIP serving it, as configured (`10.0.0.0/24:*/tcp`); None: not
    /// VIP traffic, or an entry the agent does not know.
    #[serde(default)]
    pub served_by: Option<String>,
    /// Which lookup found the VIP.
    #[serde(default)]
    pub lookup: Option<Lookup>,
    /// Client address and port.
    pub client: String,
    /// Algorithm of the VIP (as published), if it is one.
    pub algo: Option<String>,
    /// The 5-tuple hash (Maglev) or source hash (source-hash) used.
    pub hash: Option<String>,
    /// Entries of the VIP's published table (0: no usable backend).
    pub table_size: u32,
    /// What the table gives this flow now (hash algorithms).
    pub table_index: Option<u32>,
    /// The backend at that index.
    pub table_backend: Option<BackendRef>,
    /// The flow's connection-table set (None without a client port).
    pub conntrack_set: Option<u32>,
    /// The flow's entry there, if any.
    pub conntrack_entry: Option<EntryShown>,
    /// The client's persistence entry, if any.
    pub persistence: Option<PersistShown>,
    /// The flow's next packet (not a pure SYN).
    pub next_packet: Decision,
    /// A pure SYN on this 5-tuple (a new connection).
    pub syn: Decision,
    /// The backend of `next_packet`, shown.
    pub next_backend: Option<BackendRef>,
    /// The backend of `syn`, shown.
    pub syn_backend: Option<BackendRef>,
    /// When the answer may change.
    pub may_change: Vec<String>,
}


fn shown_backend(b: &Option<BackendRef>) -> String {
    match b {
        Some(b) => format!("{} (id {}{})", b.ip.as_deref().unwrap_or("?"), b.id, if b.alive { "" } else { ", not alive" }),
        None => "-".into(),
    }
}

fn shown_decision(d: &Decision, b: &Option<BackendRef>) -> String {
    let what = match (&d.verdict, b) {
        (Some(v), Some(_)) if v == Stat::Forwarded.name() => format!("→ {}", shown_backend(b)),
        (Some(v), _) => v.clone(),
        (None, _) => "unpredictable".into(),
    };
    format!("{what}: {}", d.why)
}

/// The explanation as lines for a terminal.
pub fn render(e: &Explanation) -> String {
    let mut out = format!("flow      {} → {} ({})\n", e.client, e.vip, e.algo.as_deref().unwrap_or("not a VIP"));
    if let (Some(v), Some(l)) = (&e.served_by, e.lookup) {
        out += &format!("vip       {v}: {}\n", l.why());
    }
    if let Some(h) = &e.hash {
        out += &format!("hash      {h}\n");
    }
    if let (Some(i), Some(b)) = (e.table_index, &e.table_backend) {
        out += &format!("table     entry {i} of {} → {}\n", e.table_size, shown_backend(&Some(b.clone())));
    } else if e.algo.is_some() && e.table_size == 0 {
        out += "table     empty (no usable backend)\n";
    }
    match (e.conntrack_set, &e.conntrack_entry) {
        (None, _) => out += "conntrack no client port given: not looked up\n",
        (Some(s), None) => out += &format!("conntrack set {s}: no entry for this flow\n"),
        (Some(s), Some(c)) => {
            out += &format!(
                "conntrack set {s} way {}: {} generation {}, seen {} ms ago{}\n",
                c.way,
                shown_backend(&Some(c.backend.clone())),
                c.generation,
                c.age_ms,
                if c.closed { ", closed" } else { "" }
            )
        }
    }
    if let Some(p) = &e.persistence {
        out += &format!("persist   {} for {} s more\n", shown_backend(&Some(p.backend.clone())), p.remaining_s);
    }
    out += &format!("next      {}\n", shown_decision(&e.next_packet, &e.next_backend));
    out += &format!("syn       {}\n", shown_decision(&e.syn, &e.syn_backend));
    for c in &e.may_change {
        out += &format!("may change: {c}\n");
    }
    out
}
