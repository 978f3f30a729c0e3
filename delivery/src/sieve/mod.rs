//! Sieve filters at local delivery (RFC 5228, with the `sieve-rs` interpreter): which scripts
//! apply, how one run becomes a verdict, and how the local agent carries it out as the user.
//!
//! A recipient's filter is one run of up to three scripts, in the order `[sieve] before`,
//! the mailbox's `sieve` or the user's own script, `[sieve] after`, sharing one implicit
//! keep as scripts joined by `include` do (RFC 6609). The run only *decides*; nothing is
//! stored or sent until it has ended well. A script that does not compile, or a run that
//! fails or exceeds its limits, leaves the mail kept in the inbox and the reason logged.

mod cache;
mod child;
mod run;
mod store;
pub mod tool;

pub use cache::{Cache, Learned};
pub use child::{filter, prepare, Filtered, Filters, Outgoing, Prepared, Request};
pub use run::{evaluate, Action, Envelope, Host, Msg, Scripts, Verdict};

use qms_common::config;
use sieve::compiler::grammar::Capability;
use sieve::{Compiler, Runtime, Sieve};
use std::sync::{Arc, OnceLock};

/// The extensions scripts may `require`. Left out: those qms has nothing behind
/// (notifications, external lists, spam and virus scores, metadata, mailbox ids,
/// IMAP events, deliver-by, conversion).
const REFUSED: &[Capability] = &[
    Capability::EnvelopeDeliverBy,
    Capability::RedirectDeliverBy,
    Capability::Enotify,
    Capability::ExtLists,
    Capability::MailboxId,
    Capability::MboxMetadata,
    Capability::ServerMetadata,
    Capability::SpecialUse,
    Capability::ImapSieve,
    Capability::SpamTest,
    Capability::SpamTestPlus,
    Capability::VirusTest,
    Capability::Convert,
];

/// The compiler, with `[sieve]`'s size limit.
pub fn compiler(cfg: &config::Sieve) -> Compiler {
    Compiler::new().with_max_script_size(cfg.max_script_size)
}

/// The interpreter, with `[sieve]`'s limits and this host's name on vacation replies.
pub fn runtime(cfg: &config::Sieve, hostname: &str) -> Runtime {
    let mut rt = Runtime::new()
        .with_cpu_limit(cfg.max_instructions)
        .with_max_redirects(cfg.max_redirects)
        .with_max_out_messages(cfg.max_redirects + cfg.max_vacation_replies)
        .with_local_hostname(hostname.to_string())
        .with_vacation_default_subject("Automatic reply")
        .with_env_variable("name", "qms")
        .with_env_variable("version", env!("CARGO_PKG_VERSION"))
        .with_env_variable("domain", hostname.to_string())
        .with_env_variable("host", hostname.to_string())
        .with_env_variable("phase", "during");
    for c in REFUSED {
        rt.unset_capability(c.clone());
    }
    rt
}

/// Compiles `text`; the error names its line and column, as `sieve check` prints it.
pub fn compile(compiler: &Compiler, text: &[u8]) -> Result<Sieve, String> {
    compiler.compile(text).map_err(|e| match e.line_num() {
        0 => e.to_string(),
        n => format!("line {n}, column {}: {e}", e.line_pos()),
    })
}

/// The script every run starts with: the configured scripts in their order, by the names
/// `run::evaluate` resolves. Compiled once per process.
fn wrapper() -> Arc<Sieve> {
    static WRAPPER: OnceLock<Arc<Sieve>> = OnceLock::new();
    WRAPPER
        .get_or_init(|| {
            let text = format!(
                "require \"include\";\n\
                 include :global :optional \"{}\";\n\
                 include :personal :optional \"{}\";\n\
                 include :global :optional \"{}\";\n",
                run::BEFORE,
                run::MAIN,
                run::AFTER
            );
            // A constant text: a failure is a bug that every test finds.
            Arc::new(
                Compiler::new()
                    .compile(text.as_bytes())
                    .expect("the wrapper script compiles"),
            )
        })
        .clone()
}
