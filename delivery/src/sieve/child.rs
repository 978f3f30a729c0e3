//! One recipient's filter, run in a child process that has become the mailbox's user: it
//! reads the scripts as that user, runs them, stores what they keep and file, and reports
//! back what the agent must send (redirects, vacation replies) or bounce (a reject).

use super::cache::{Cache, Key, Learned};
use super::run::{self, Action, Envelope, Host, Msg, Scripts, Verdict};
use super::store::{self, Copy};
use crate::maildir;
use base64::Engine;
use qms_common::config;
use qms_common::privs::Account;
use qms_common::safeio;
use serde::{Deserialize, Serialize};
use sieve::{Compiler, Runtime, Sieve};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The agent's side of filtering: settings, interpreter and compiled scripts.
pub struct Filters<'a> {
    pub cfg: &'a config::Sieve,
    pub runtime: &'a Runtime,
    pub compiler: &'a Compiler,
    pub cache: &'a Cache,
    pub hostname: &'a str,
}

/// One recipient's filtering.
pub struct Request<'a> {
    /// Whom the child becomes; None: it stays this process's user (qms unprivileged).
    pub account: Option<&'a Account>,
    pub inbox: &'a Path,
    /// Whether a missing inbox may be made (a configured mailbox).
    pub create_inbox: bool,
    /// The mailbox's script, or the user's own (`user_owned`).
    pub script: Option<PathBuf>,
    pub user_owned: bool,
    /// The message as received (CRLF).
    pub message: &'a [u8],
    pub sender: &'a str,
    pub recipient: &'a str,
    pub orcpt: &'a str,
    /// The stable part of each stored copy's name (`maildir::Name`).
    pub arrival: i64,
    pub key: &'a str,
    /// Look before storing: an earlier attempt may have stored some copies.
    pub recheck: bool,
}

/// A message the agent queues for the filter: a redirect or a vacation reply.
#[derive(Debug, Serialize, Deserialize)]
pub struct Outgoing {
    pub to: String,
    pub vacation: bool,
    /// Base64 of the message; None: the message as received.
    message: Option<String>,
}

impl Outgoing {
    pub fn message(&self) -> Option<Vec<u8>> {
        let b = self.message.as_ref()?;
        base64::engine::general_purpose::STANDARD.decode(b).ok()
    }
}

/// What the filter did, as the child reports it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Filtered {
    /// The folders a copy is in (`INBOX` for a keep).
    pub stored: Vec<String>,
    pub discarded: bool,
    pub rejected: Option<String>,
    pub outgoing: Vec<Outgoing>,
    /// Why the scripts were set aside for a plain keep.
    pub error: Option<String>,
    /// Actions refused on the way.
    pub notes: Vec<String>,
    pub learned: Vec<Learned>,
}

/// Runs the filter for `req` in a child as its user; Err: a temporary failure.
pub fn filter(f: &Filters, req: &Request) -> Result<Filtered, String> {
    let limit = req.message.len().saturating_mul(2) + (1 << 20);
    let out = crate::runas::run_bounded(req.account, f.cfg.cpu_time, limit, || {
        let result = inside(f, req);
        serde_json::to_vec(&result).unwrap_or_default()
    })?;
    match serde_json::from_slice::<Result<Filtered, String>>(&out) {
        Ok(r) => r,
        Err(e) => Err(format!("the filter process's report: {e}")),
    }
}

/// A filter's run in a process that has become the user, its copies staged but not yet
/// durable: the caller commits them (with others, one sync), then calls `complete`.
pub struct Prepared {
    done: Filtered,
    pub staged: Vec<safeio::Staged>,
}

impl Prepared {
    /// The report, once the copies are durable.
    pub fn complete(self) -> Filtered {
        self.done
    }
}

/// The filter's work, in a process that has become the user.
pub fn inside(f: &Filters, req: &Request) -> Result<Filtered, String> {
    let mut p = prepare(f, req)?;
    let staged = std::mem::take(&mut p.staged);
    if let Err(e) = safeio::commit(&staged) {
        staged.into_iter().for_each(safeio::Staged::abandon);
        return Err(format!("4.3.0 Maildir {}: {e}", req.inbox.display()));
    }
    Ok(p.complete())
}

/// Reads and runs the scripts, and stages what the verdict keeps and files.
pub fn prepare(f: &Filters, req: &Request) -> Result<Prepared, String> {
    let mut host = ChildHost {
        f,
        inbox: req.inbox,
        personal_dir: req
            .script
            .as_ref()
            .and_then(|p| p.parent())
            .map(Path::to_path_buf),
        memory: store::Memory::load(req.inbox),
        learned: Vec::new(),
    };
    let scripts = host.scripts(req);
    let verdict = match scripts {
        Ok(s) => {
            let env = Envelope {
                from: req.sender,
                to: req.recipient,
                orcpt: req.orcpt,
            };
            run::evaluate(
                f.runtime,
                f.cfg.max_vacation_replies,
                &s,
                req.message,
                &env,
                &mut host,
            )
        }
        Err(e) => Verdict::keep_because(e),
    };
    let (mut done, staged) = carry_out(f, req, &verdict)?;
    // Remembered now, before the next recipient's run in this process looks: two messages
    // from one sender in one batch get one reply. A crash before the copies are durable
    // costs a reply, never a second one.
    if let Err(e) = host.memory.remember(&verdict.remember) {
        let why = format!("the memory of replies was not written ({e}); a reply may repeat");
        done.notes.push(why);
    }
    done.error = verdict.error;
    done.notes.extend(verdict.notes);
    done.learned = host.learned;
    Ok(Prepared { done, staged })
}

/// Stages the copies the verdict keeps and files; lists what the agent must send.
fn carry_out(
    f: &Filters,
    req: &Request,
    v: &Verdict,
) -> Result<(Filtered, Vec<safeio::Staged>), String> {
    let mut done = Filtered::default();
    let local = |m: &Msg| match m {
        Msg::Original => maildir::local_copy(req.sender, req.recipient, req.message),
        Msg::Edited(e) => maildir::local_copy(req.sender, req.recipient, e),
    };
    let mut copies: Vec<(String, PathBuf, String, Vec<u8>)> = Vec::new();
    let mut add = |folder: &str, flags: &[String], m: &Msg, done: &mut Filtered| {
        let (name, dir) = match store::folder_dir(req.inbox, folder) {
            Ok(d) => (folder.to_string(), d),
            Err(e) => {
                done.notes.push(format!("{e}; filed in INBOX"));
                ("INBOX".to_string(), req.inbox.to_path_buf())
            }
        };
        // One copy per folder, however often a script names it (RFC 5228 4.1).
        if copies.iter().all(|(_, d, _, _)| *d != dir) {
            copies.push((name, dir, store::info(flags), local(m)));
        }
    };
    for a in &v.actions {
        match a {
            Action::Keep { flags, message } => add("INBOX", flags, message, &mut done),
            Action::FileInto {
                folder,
                flags,
                message,
            } => add(folder, flags, message, &mut done),
            Action::Redirect { to, message } => done.outgoing.push(Outgoing {
                to: to.clone(),
                vacation: false,
                message: match message {
                    Msg::Original => None,
                    Msg::Edited(e) => Some(base64::engine::general_purpose::STANDARD.encode(e)),
                },
            }),
            Action::Vacation { to, message } => done.outgoing.push(Outgoing {
                to: to.clone(),
                vacation: true,
                message: Some(base64::engine::general_purpose::STANDARD.encode(message)),
            }),
            Action::Discard => done.discarded = true,
            Action::Reject { reason } => done.rejected = Some(reason.clone()),
        }
    }
    if done.rejected.is_some() {
        // A refusal stands for the delivery: nothing is stored or sent on.
        done.outgoing.retain(|o| o.vacation);
        return Ok((done, Vec::new()));
    }
    let list: Vec<Copy> = copies
        .iter()
        .map(|(_, dir, info, m)| Copy {
            dir: dir.clone(),
            info: info.clone(),
            message: m,
        })
        .collect();
    let staged = store::stage(&list, req.inbox, req.create_inbox, req.recheck, &|c| {
        maildir::Name::new(req.arrival, req.key, f.hostname, c.message.len())
    })
    .map_err(|e| format!("4.3.0 Maildir {}: {e}", req.inbox.display()))?;
    done.stored = copies.into_iter().map(|(n, ..)| n).collect();
    Ok((done, staged))
}

/// The child's answers to the run: scripts read as the user, the folders, the memory.
struct ChildHost<'a> {
    f: &'a Filters<'a>,
    inbox: &'a Path,
    personal_dir: Option<PathBuf>,
    memory: store::Memory,
    learned: Vec<Learned>,
}

impl ChildHost<'_> {
    /// The run's three scripts; Err when one does not compile or may not be trusted.
    fn scripts(&mut self, req: &Request) -> Result<Scripts, String> {
        let cfg = self.f.cfg;
        Ok(Scripts {
            before: self.load(cfg.before.as_deref(), false)?,
            main: self.load(req.script.as_deref(), req.user_owned)?,
            after: self.load(cfg.after.as_deref(), false)?,
        })
    }

    /// The compiled script at `path`; None when there is no such file.
    fn load(
        &mut self,
        path: Option<&Path>,
        user_owned: bool,
    ) -> Result<Option<Arc<Sieve>>, String> {
        let Some(path) = path else { return Ok(None) };
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let meta = file
            .metadata()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        trusted(path, &meta, user_owned)?;
        let key = Key::of(path, &meta);
        if let Some(s) = self.f.cache.get(&key) {
            return Ok(Some(s));
        }
        let mut text = Vec::new();
        let max = self.f.cfg.max_script_size as u64;
        file.take(max + 1)
            .read_to_end(&mut text)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if text.len() as u64 > max {
            return Err(format!(
                "{}: longer than [sieve] max_script_size ({max} bytes)",
                path.display()
            ));
        }
        let s = super::compile(self.f.compiler, &text)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if let Ok(text) = String::from_utf8(text) {
            self.learned.push(Learned { key, text });
        }
        Ok(Some(Arc::new(s)))
    }
}

/// A script is run only when it is a regular file that its user (or root, for the
/// system's scripts) owns and nobody else may write.
fn trusted(path: &Path, m: &std::fs::Metadata, user_owned: bool) -> Result<(), String> {
    let me = nix::unistd::geteuid().as_raw();
    let owner_ok = m.uid() == 0 || m.uid() == me || !user_owned;
    if !m.is_file() || !owner_ok || m.mode() & 0o022 != 0 {
        return Err(format!(
            "{}: not run: a script must be a file that its user or root owns and only its owner may write",
            path.display()
        ));
    }
    Ok(())
}

impl Host for ChildHost<'_> {
    fn include(&mut self, global: bool, name: &str) -> Result<Option<Arc<Sieve>>, String> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(format!("script name {name:?} refused"));
        }
        let dir = match global {
            true => Some(self.f.cfg.global_dir.clone()),
            false => self.personal_dir.clone(),
        };
        let Some(dir) = dir else { return Ok(None) };
        let file = match name.ends_with(".sieve") {
            true => dir.join(name),
            false => dir.join(format!("{name}.sieve")),
        };
        self.load(Some(&file), !global)
    }

    fn folder_exists(&self, name: &str) -> bool {
        store::folder_dir(self.inbox, name).is_ok_and(|d| d.join("cur").is_dir())
    }

    fn seen(&mut self, id: &str) -> bool {
        self.memory.seen(id)
    }
}
