//! What an operator writes: VIP and MAC syntax, health-check settings and the
//! TOML config file. Every parser here returns a one-line error and is used
//! by the CLI, the API and the config file alike, so all three accept and
//! reject exactly the same input.
//!
//! - [`vip`]: the service (`Vip`, `Proto`, `HashMode`, `VipOpts`);
//! - [`names`]: the other operator words (`AlgoName`, `ForwardName`, `Mac`,
//!   `AllDown`, `Admin`), one `FromStr`/`Display` each;
//! - [`health`]: health-check settings (`HealthConfig`, `CheckKind`);
//! - [`rules`]: the rules across values (backend address, weight, slow
//!   start, persistence, any-port checks), each checked only there;
//! - [`sync`]: connection-table sync settings (flags and `[sync]`);
//! - [`file`]: the TOML schema; [`desired`]: a file validated in full;
//! - [`text`]: serde through `FromStr`/`Display` (the API's field form).

pub mod desired;
pub mod file;
pub mod health;
pub mod names;
pub mod rules;
pub mod sync;
pub mod text;
pub mod vip;

pub use desired::{Desired, DesiredBackend, DesiredVip};
pub use file::{BackendConfig, FileConfig, SyncConfig, VipConfig};
pub use health::{kind_for, CheckKind, HealthConfig};
pub use names::{parse_algo, Admin, AlgoName, AllDown, ForwardName, Mac};
pub use rules::{
    check_any_port_health, check_backend_ip, check_backend_ip_for, check_persist, check_slow_start, check_unicast, check_weight,
    parse_backend_ip, DEFAULT_WEIGHT, MAX_SLOW_START_MS, MAX_WEIGHT,
};
pub use vip::{mask, HashMode, Proto, Vip, VipOpts, ANY_PORT};
