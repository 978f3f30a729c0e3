//! Shared pieces of qms: configuration, addresses, logging, time and durable file writes.
//!
//! Everything here is used by more than one process role; nothing here knows about queues.

pub mod address;
pub mod aliases;
pub mod config;
pub mod conn;
pub mod headers;
pub mod log;
pub mod privs;
pub mod safeio;
pub mod time;
pub mod tls;
pub mod track;
pub mod verp;

pub use address::Address;
pub use config::Config;
