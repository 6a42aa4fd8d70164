//! xlb's system-test support: a namespace lab, test servers and clients,
//! crafted frames for BPF_PROG_TEST_RUN, and the demo built from them.

pub mod bench;
pub mod demo;
pub mod frames;
pub mod lab;
pub mod routed;
pub mod scale;
pub mod scenario;
pub mod traffic;
pub mod xdp;
