//! Diagnosis for the operator, read from the running datapath (never from a
//! model of it): `explain` says where one flow goes now and why, `trace`
//! streams sampled frames from the datapath, `flows` lists the connection
//! table's live entries.

pub mod explain;
pub mod flows;
pub mod trace;
