//! xlb: an XDP L4 load balancer with L2 direct server return.
//!
//! This library is the `xlb` binary's agent and CLI; the system tests use it
//! to drive the datapath exactly as the agent does.
#![deny(missing_docs)]

pub mod agent;
pub mod api;
pub mod cli;
pub mod config;
pub mod conntrack;
pub mod ctsync;
pub mod daemon;
pub mod diag;
pub mod encap;
pub mod ha;
pub mod health;
pub mod host;
pub mod maglev;
pub mod maps;
pub mod metrics;
pub mod mmap;
pub mod neigh;
pub mod pin;
pub mod state;
pub mod stats;
pub mod tables;
