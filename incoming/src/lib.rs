//! The incoming side of qms: SMTP listeners and local `sendmail` injection, both writing
//! each accepted message durably into the spool's `incoming` queue.

pub mod auth;
pub mod authcheck;

mod data;
pub mod dovecot;
pub mod pickup;
pub mod policy;
mod receive;
mod seats;
pub mod sendmail;
mod session;
pub mod smtpd;
mod submission;
pub mod tls;

pub use qms_common::conn::{Conn, Stream};
pub use session::{Kind, Peer, Session, Shared};
