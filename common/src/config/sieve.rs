//! `[sieve]`: the filters local delivery runs (RFC 5228), and the limits of their sandbox.
//!
//! ```toml
//! [sieve]
//! before = "/etc/qms/sieve/before.sieve"   # every recipient's filter starts with this
//! after = "/etc/qms/sieve/after.sieve"     # and ends with this
//! user_script = ".qms.sieve"               # in each system user's home; "" for none
//! global_dir = "/etc/qms/sieve"            # where `include :global "NAME"` looks
//! max_script_size = 65536
//! max_instructions = 100000
//! cpu_time = 10                          # CPU seconds of the filter process
//! max_redirects = 4
//! max_vacation_replies = 1
//! ```

use super::raw::Secs;
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct Sieve {
    /// Run before the mailbox's or user's own script, in the same run (as by `include`).
    pub before: Option<PathBuf>,
    /// Run after it, unless a script said `stop`.
    pub after: Option<PathBuf>,
    /// A system user's own script, relative to the home directory; None: users have none.
    pub user_script: Option<PathBuf>,
    /// Where `include :global "NAME"` finds `NAME.sieve`.
    pub global_dir: PathBuf,
    /// Scripts longer than this are not compiled (the mail is kept).
    pub max_script_size: usize,
    /// Instructions one run may execute before it is stopped (the mail is kept).
    pub max_instructions: usize,
    /// CPU seconds of the process that runs a filter (`RLIMIT_CPU`).
    pub cpu_time: u64,
    /// Redirects one message may cause per recipient.
    pub max_redirects: usize,
    /// Vacation replies one message may cause per recipient.
    pub max_vacation_replies: usize,
}

impl Default for Sieve {
    fn default() -> Sieve {
        Sieve {
            before: None,
            after: None,
            user_script: Some(PathBuf::from(".qms.sieve")),
            global_dir: PathBuf::from("/etc/qms/sieve"),
            max_script_size: 65_536,
            max_instructions: 100_000,
            cpu_time: 10,
            max_redirects: 4,
            max_vacation_replies: 1,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSieve {
    before: Option<String>,
    after: Option<String>,
    user_script: Option<String>,
    global_dir: Option<String>,
    max_script_size: Option<usize>,
    max_instructions: Option<usize>,
    cpu_time: Option<Secs>,
    max_redirects: Option<usize>,
    max_vacation_replies: Option<usize>,
}

impl RawSieve {
    /// The typed section; errors name the key.
    pub(super) fn build(
        self,
        resolve: &dyn Fn(&str) -> PathBuf,
    ) -> Result<Sieve, (String, String)> {
        let d = Sieve::default();
        let user_script = match self.user_script.as_deref() {
            None => d.user_script,
            Some("") => None,
            Some(p) if p.starts_with('/') || p.split('/').any(|c| c == "..") => {
                return Err((
                    "sieve.user_script".into(),
                    "must be a path inside the home directory (relative, without ..)".into(),
                ))
            }
            Some(p) => Some(PathBuf::from(p)),
        };
        let cpu_time = self.cpu_time.map_or(d.cpu_time, |s| s.get());
        if cpu_time == 0 {
            return Err(("sieve.cpu_time".into(), "must be at least 1s".into()));
        }
        Ok(Sieve {
            before: self.before.as_deref().map(resolve),
            after: self.after.as_deref().map(resolve),
            user_script,
            global_dir: self.global_dir.as_deref().map_or(d.global_dir, resolve),
            max_script_size: self.max_script_size.unwrap_or(d.max_script_size),
            max_instructions: self.max_instructions.unwrap_or(d.max_instructions),
            cpu_time,
            max_redirects: self.max_redirects.unwrap_or(d.max_redirects),
            max_vacation_replies: self.max_vacation_replies.unwrap_or(d.max_vacation_replies),
        })
    }
}
