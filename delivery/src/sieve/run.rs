//! One run of a recipient's filter: the interpreter's events answered, its actions collected
//! into a verdict. Nothing here writes or sends; `store` and the local agent carry it out.

use sieve::compiler::grammar::actions::action_redirect::Notify;
use sieve::runtime::RuntimeError;
use sieve::{Event, Input, Recipient, Runtime, Script, Sieve};
use std::collections::HashMap;
use std::sync::Arc;

/// The names the wrapper script includes (`mod.rs`); a `:` keeps them apart from any file.
pub(super) const BEFORE: &str = "qms:before";
pub(super) const MAIN: &str = "qms:main";
pub(super) const AFTER: &str = "qms:after";

/// The envelope a script sees.
pub struct Envelope<'a> {
    /// The envelope sender; empty for `<>`.
    pub from: &'a str,
    /// The recipient being delivered to.
    pub to: &'a str,
    /// The recipient as the client gave it, before aliases.
    pub orcpt: &'a str,
}

/// What a run asks of the place it runs in.
pub trait Host {
    /// The script `include` names (`global`: `[sieve] global_dir`; else beside the user's
    /// script); None when there is none.
    fn include(&mut self, global: bool, name: &str) -> Result<Option<Arc<Sieve>>, String>;
    /// Whether a folder exists (the `mailbox` extension).
    fn folder_exists(&self, name: &str) -> bool;
    /// Whether `id` was remembered and has not expired (`vacation`, `duplicate`).
    fn seen(&mut self, id: &str) -> bool;
}

/// Which copy of the message an action takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    Original,
    /// As `editheader` left it.
    Edited(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Into the inbox.
    Keep {
        flags: Vec<String>,
        message: Msg,
    },
    FileInto {
        folder: String,
        flags: Vec<String>,
        message: Msg,
    },
    Redirect {
        to: String,
        message: Msg,
    },
    /// A reply to the envelope sender, sent with the null sender.
    Vacation {
        to: String,
        message: Vec<u8>,
    },
    Discard,
    /// Refused after the fact: the sender gets a DSN with this reason.
    Reject {
        reason: String,
    },
}

/// What a run decided.
#[derive(Debug, Default)]
pub struct Verdict {
    pub actions: Vec<Action>,
    /// Ids to remember once the actions are carried out, with their lifetime in seconds.
    pub remember: Vec<(String, u64)>,
    /// Why the scripts' actions were dropped for a plain keep.
    pub error: Option<String>,
    /// Actions refused along the way, for the log.
    pub notes: Vec<String>,
}

impl Verdict {
    /// The fallback: keep in the inbox, and say why.
    pub fn keep_because(why: String) -> Verdict {
        Verdict {
            actions: vec![Action::Keep {
                flags: Vec::new(),
                message: Msg::Original,
            }],
            error: Some(why),
            ..Verdict::default()
        }
    }
}

/// The scripts of one run, by their place in it.
pub struct Scripts {
    pub before: Option<Arc<Sieve>>,
    pub main: Option<Arc<Sieve>>,
    pub after: Option<Arc<Sieve>>,
}

/// Runs `scripts` on `message` (as received, CRLF) for one recipient; at most
/// `max_vacation` replies are kept.
pub fn evaluate(
    runtime: &Runtime,
    max_vacation: usize,
    scripts: &Scripts,
    message: &[u8],
    env: &Envelope,
    host: &mut dyn Host,
) -> Verdict {
    let mut ctx = runtime
        .filter(message)
        .with_envelope(sieve::Envelope::From, env.from)
        .with_envelope(sieve::Envelope::To, env.to)
        .with_envelope(sieve::Envelope::Orcpt, env.orcpt)
        .with_user_address(env.to);
    let mut run = Run {
        scripts,
        env,
        host,
        max_vacation,
        v: Verdict::default(),
        created: HashMap::new(),
        vacations: 0,
        refused: false,
    };
    let mut input = Input::script("qms:wrapper", super::wrapper());
    while let Some(result) = ctx.run(input) {
        input = match result
            .map_err(|e| runtime_error(&e))
            .and_then(|e| run.answer(e))
        {
            Ok(i) => i,
            Err(why) => return Verdict::keep_because(why),
        };
    }
    let mut v = run.v;
    // A refused redirect had cancelled the implicit keep: the mail must still go somewhere.
    let placed = v
        .actions
        .iter()
        .any(|a| !matches!(a, Action::Vacation { .. }));
    if run.refused && !placed {
        v.actions.push(Action::Keep {
            flags: Vec::new(),
            message: Msg::Original,
        });
    }
    v
}

/// One run's state between the interpreter's events.
struct Run<'a> {
    scripts: &'a Scripts,
    env: &'a Envelope<'a>,
    host: &'a mut dyn Host,
    max_vacation: usize,
    v: Verdict,
    /// Messages the script made (edited copies, vacation replies), by the interpreter's id.
    created: HashMap<usize, Vec<u8>>,
    vacations: usize,
    /// A redirect was refused (see `evaluate`).
    refused: bool,
}

impl Run<'_> {
    fn msg(&self, id: usize) -> Msg {
        match self.created.get(&id) {
            Some(m) if id > 0 => Msg::Edited(m.clone()),
            _ => Msg::Original,
        }
    }

    /// Answers one event and notes its action; Err: the run must end with a plain keep.
    fn answer(&mut self, event: Event) -> Result<Input, String> {
        match event {
            Event::IncludeScript { name, optional } => {
                let found = match &name {
                    Script::Global(n) if n == BEFORE => Ok(self.scripts.before.clone()),
                    Script::Personal(n) if n == MAIN => Ok(self.scripts.main.clone()),
                    Script::Global(n) if n == AFTER => Ok(self.scripts.after.clone()),
                    Script::Global(n) => self.host.include(true, n),
                    Script::Personal(n) => self.host.include(false, n),
                };
                return match found {
                    Ok(Some(s)) => Ok(Input::script(name, s)),
                    Ok(None) if optional => Ok(Input::False),
                    Ok(None) => Err(format!("included script {name} not found")),
                    Err(e) => Err(format!("include {name}: {e}")),
                };
            }
            Event::MailboxExists { mailboxes, .. } => {
                let all = mailboxes.iter().all(|m| match m {
                    sieve::Mailbox::Name(n) => self.host.folder_exists(n),
                    sieve::Mailbox::Id(_) => false,
                });
                return Ok(all.into());
            }
            Event::ListContains { .. } | Event::Function { .. } => return Ok(Input::False),
            Event::DuplicateId { id, expiry, .. } => {
                let seen = self.host.seen(&id);
                if !seen {
                    self.v.remember.push((id, expiry));
                }
                return Ok(seen.into());
            }
            Event::SetEnvelope { .. } => {}
            Event::Keep { flags, message_id } => {
                let message = self.msg(message_id);
                self.v.actions.push(Action::Keep { flags, message })
            }
            Event::FileInto {
                folder,
                flags,
                message_id,
                ..
            } => {
                let message = self.msg(message_id);
                self.v.actions.push(Action::FileInto {
                    folder,
                    flags,
                    message,
                })
            }
            Event::Discard => self.v.actions.push(Action::Discard),
            Event::Reject { reason, .. } => self.v.actions.push(Action::Reject { reason }),
            Event::CreatedMessage {
                message_id,
                message,
            } => {
                self.created.insert(message_id, message);
            }
            Event::SendMessage {
                recipient,
                message_id,
                notify,
                ..
            } => self.send(recipient, message_id, notify),
            Event::Notify { method, .. } => self
                .v
                .notes
                .push(format!("notify {method:?} not supported; ignored")),
        }
        Ok(Input::True)
    }

    /// A redirect, or the reply vacation made: only vacation sends a message it made itself
    /// to the sender, never asking for DSNs. A redirect to the sender is refused.
    fn send(&mut self, recipient: Recipient, message_id: usize, notify: Notify) {
        let to = match recipient {
            Recipient::Address(a) => a,
            Recipient::List(l) => {
                self.refused = true;
                self.v
                    .notes
                    .push(format!("redirect :list {l:?} refused: no lists here"));
                return;
            }
            Recipient::Group(g) => g.join(","),
        };
        let to_sender = !self.env.from.is_empty() && to.eq_ignore_ascii_case(self.env.from);
        let reply = self
            .created
            .get(&message_id)
            .filter(|m| message_id > 0 && notify == Notify::Never && is_auto_reply(m))
            .cloned();
        match (to_sender, reply) {
            (true, Some(message)) if self.vacations < self.max_vacation => {
                self.vacations += 1;
                self.v.actions.push(Action::Vacation { to, message });
            }
            (true, Some(_)) => self
                .v
                .notes
                .push(format!("vacation reply to {to} over the limit; not sent")),
            (true, None) => {
                self.refused = true;
                self.v
                    .notes
                    .push(format!("redirect to the sender {to} refused; kept"))
            }
            (false, _) => {
                let message = self.msg(message_id);
                self.v.actions.push(Action::Redirect { to, message })
            }
        }
    }
}

/// A message the vacation action built (it marks its replies so).
fn is_auto_reply(m: &[u8]) -> bool {
    let head = &m[..m.len().min(4096)];
    String::from_utf8_lossy(head)
        .lines()
        .take_while(|l| !l.is_empty())
        .any(|l| l.eq_ignore_ascii_case("auto-submitted: auto-replied"))
}

fn runtime_error(e: &RuntimeError) -> String {
    match e {
        RuntimeError::CPULimitReached => {
            "the filter ran longer than [sieve] max_instructions allows; stopped".into()
        }
        RuntimeError::TooManyIncludes => "too many nested includes".into(),
        RuntimeError::InvalidInstruction(i) => format!(
            "invalid instruction {} at line {}, column {}",
            i.name(),
            i.line_num(),
            i.line_pos()
        ),
        RuntimeError::ScriptErrorMessage(m) => format!("the script called error: {m}"),
        RuntimeError::CapabilityNotAllowed(c) => format!("extension {c} is not allowed here"),
        RuntimeError::CapabilityNotSupported(c) => format!("extension {c} is not supported"),
    }
}
