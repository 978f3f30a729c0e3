//! The on-disk queue of qms: immutable message files, JSON job files, one directory per queue.
//!
//! Every process role works through this crate: servers enqueue into `incoming`, the router
//! moves jobs to output queues, workers claim jobs with file locks, and the queue tools read
//! and change jobs while workers run. See docs/architecture.md for the layout.

mod attempt;
mod commit;
mod free;
mod id;
mod inline;
mod job;
pub mod maildrop;
pub mod perms;
mod recover;
pub mod reserve;
mod store;
mod watch;

pub use commit::Committer;
pub use free::empty_pending;
pub use id::QueueId;
pub use job::{
    Client, DsnRet, Job, LinkSecurity, Notify, RcptState, Recipient, Smarthost, JOB_VERSION,
};
pub use store::{Claim, Claimed, Mapped, Spool, SpoolError, Staged, Writer, JOB_AREAS};
pub use watch::{Share, WatchOptions, Watcher, SHARE_ENV};
