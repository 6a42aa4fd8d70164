//! Per-CPU records the programs keep in maps (`maps`) rather than on the
//! 512-byte BPF stack: the FIB lookup's parameters, the hand-off from the
//! balancer to `xlb_encap`, and the tracing program's notes on a frame.
//! Their code is in `encap` and `trace`.

use lb_common::FlowKey;

/// `struct bpf_fib_lookup` with its unions flattened (64 bytes, the
/// kernel's layout): what goes in and what the kernel writes back.
#[repr(C)]
pub struct FibParams {
    pub(crate) family: u8,
    pub(crate) l4_protocol: u8,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    /// In: the packet's length (the kernel checks it against the route's
    /// MTU). Out on `FIB_FRAG_NEEDED`: that MTU.
    pub(crate) tot_len: u16,
    pub(crate) ifindex: u32,
    /// IPv4 TOS / IPv6 flow info in; route metric out.
    pub(crate) tos: u32,
    /// In: the outer source (not written back without BPF_FIB_LOOKUP_SRC).
    pub(crate) src: [u8; 16],
    /// In: the backend. Out: the next hop (gateway).
    pub(crate) dst: [u8; 16],
    pub(crate) vlan: u32,
    pub(crate) smac: [u8; 6],
    pub(crate) dmac: [u8; 6],
}

/// What the balancer chose for a frame to a routed backend.
#[repr(C)]
pub struct Handoff {
    /// The flow.
    pub key: FlowKey,
    /// Backend id.
    pub id: u32,
    /// Frame length as received (for the backend's byte counter).
    pub bytes: u32,
    /// The frame started a connection-table entry.
    pub new_flow: u8,
    /// `Kind` of the packet: 0 flow, 1 fragment, 2 ICMP error.
    pub kind: u8,
    /// 1: handed off by `xlb_trace`, so `xlb_encap` records the frame.
    pub trace: u8,
    /// Explicit padding.
    pub _pad: u8,
}

/// What the program learnt about a frame on its way (tracing only). It
/// lives in this CPU's `XLB_TRACE_SEEN` value, not on the stack: the
/// tracing program's frame is the balancer's plus this, and BPF allows
/// 512 bytes for a program and the subprograms it calls.
pub struct Seen {
    /// The frame's MACs as they arrived (before the rewrite).
    pub macs: [u8; 12],
    /// Its 5-tuple, once parsed.
    pub key: Option<FlowKey>,
    /// The backend it was sent to.
    pub backend_id: u32,
}
