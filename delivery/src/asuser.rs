//! A batch's Maildir deliveries for one user, made by one child that has become the user:
//! plain copies staged and made durable with one sync, filtered ones run through the user's
//! Sieve filter one after the other. One fork and one sync per user and batch, where there
//! was one of each per recipient.
//!
//! Each copy keeps the stable name of its recipient's delivery (`maildir::Name`), so an
//! attempt after a crash finds what this one made, recipient by recipient.

use crate::filtering::{Delivery, Filtering, Plan};
use crate::local::Outcome;
use crate::{maildir, runas, sieve};
use qms_common::privs::Account;
use qms_common::{safeio, Config};
use qms_spool::{Claimed, Spool};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;

/// One recipient's Maildir delivery, to be made as its user.
pub struct Item {
    /// The job in the batch, and the recipient in the job.
    pub ji: usize,
    pub ri: usize,
    pub dir: PathBuf,
    /// A plain delivery's copy (with Return-Path and Delivered-To), or the message as
    /// received for a filter.
    pub message: Arc<Vec<u8>>,
    pub plan: Option<Plan>,
    /// The Maildir may be made (a configured mailbox).
    pub create: bool,
    /// The job's arrival and the recipient's key: the stable part of the copy's name.
    pub arrival: i64,
    pub key: String,
    pub recheck: bool,
}

/// How one item ended in the child.
#[derive(Serialize, Deserialize)]
enum Done {
    Stored,
    Found,
    Failed(String),
    Filtered(Result<sieve::Filtered, String>),
}

/// CPU seconds a child may use besides its filters' `[sieve] cpu_time` each.
const CPU_BASE: u64 = 60;

/// Makes `items` (all for `user`) in one child; the outcome of each, in order.
pub fn deliver(
    cfg: &Config,
    spool: &Spool,
    filtering: &Filtering,
    user: &Account,
    batch: &[Claimed],
    items: &[Item],
) -> Vec<Outcome> {
    let filters = items.iter().filter(|i| i.plan.is_some()).count() as u64;
    let cpu = CPU_BASE.saturating_add(cfg.sieve.cpu_time.saturating_mul(filters));
    let limit = items
        .iter()
        .map(|i| 2 * i.message.len() + 65_536)
        .sum::<usize>()
        + (1 << 20);
    let report = runas::run_bounded(Some(user), cpu, limit, || {
        let done = in_child(cfg, filtering, batch, items);
        serde_json::to_vec(&done).unwrap_or_default()
    })
    .and_then(|b| serde_json::from_slice::<Vec<Done>>(&b).map_err(|e| e.to_string()));
    match report {
        Ok(done) if done.len() == items.len() => items
            .iter()
            .zip(done)
            .map(|(it, d)| match d {
                Done::Stored => Outcome::Done,
                Done::Found => Outcome::Found,
                Done::Failed(why) => Outcome::Temp(why),
                Done::Filtered(r) => filtering.finish(cfg, spool, &delivery(batch, it), r),
            })
            .collect(),
        other => {
            // Some copies may be stored: the next attempt looks for them first.
            let look = crate::local::LOOK_FIRST;
            let why = match other {
                Err(e) => format!("{look}delivery as {}: {e}", user.name),
                Ok(_) => format!("{look}delivery as {}: the report is incomplete", user.name),
            };
            items.iter().map(|_| Outcome::Temp(why.clone())).collect()
        }
    }
}

/// An item as the filter sees it.
fn delivery<'a>(batch: &'a [Claimed], it: &'a Item) -> Delivery<'a> {
    Delivery {
        job: &batch[it.ji].job,
        rcpt: &batch[it.ji].job.recipients[it.ri],
        body: &it.message,
        inbox: &it.dir,
        key: &it.key,
        recheck: it.recheck,
    }
}

/// The child's work, as the user: every copy staged, one commit for all, then each filter's
/// memory of replies written.
fn in_child(cfg: &Config, filtering: &Filtering, batch: &[Claimed], items: &[Item]) -> Vec<Done> {
    let mut done: Vec<Option<Done>> = Vec::with_capacity(items.len());
    let mut files: Vec<safeio::Staged> = Vec::new();
    // What waits for the commit: a plain copy (its file is in `files`), or a filter's run.
    let mut waiting: Vec<(usize, Option<sieve::Prepared>)> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let d = match &it.plan {
            Some(plan) => match filtering.prepare_here(cfg, plan, &delivery(batch, it)) {
                Ok(mut p) => {
                    files.append(&mut p.staged);
                    waiting.push((i, Some(p)));
                    None
                }
                Err(e) => Some(Done::Filtered(Err(e))),
            },
            None => {
                let name = maildir::Name::new(it.arrival, &it.key, &cfg.hostname, it.message.len());
                match maildir::stage_once(&it.dir, it.create, &name, &it.message, it.recheck) {
                    Ok(Some(s)) => {
                        files.push(s);
                        waiting.push((i, None));
                        None
                    }
                    Ok(None) => Some(Done::Found),
                    Err(e) => Some(Done::Failed(format!(
                        "4.3.0 Maildir {}: {e}",
                        it.dir.display()
                    ))),
                }
            }
        };
        done.push(d);
    }
    let committed = safeio::commit(&files);
    if committed.is_err() {
        files.into_iter().for_each(safeio::Staged::abandon);
    }
    for (i, prepared) in waiting {
        done[i] = Some(match (&committed, prepared) {
            (Err(e), _) => Done::Failed(format!("4.3.0 Maildir write: {e}")),
            (Ok(()), None) => Done::Stored,
            (Ok(()), Some(p)) => Done::Filtered(Ok(p.complete())),
        });
    }
    done.into_iter()
        .map(|d| d.unwrap_or_else(|| Done::Failed("4.3.0 not attempted".into())))
        .collect()
}

/// Message bytes the waiting items may hold before they are delivered, whatever is left of
/// the batch: a batch of large messages does not sit in memory whole.
const HELD: usize = 32 << 20;

/// The batch's Maildir deliveries waiting to be made as their users, by uid.
#[derive(Default)]
pub struct Pending {
    users: std::collections::BTreeMap<u32, (Account, Vec<Item>)>,
    held: usize,
}

impl Pending {
    pub fn add(&mut self, user: Account, item: Item) {
        self.held += item.message.len();
        let uid = user.uid.as_raw();
        self.users
            .entry(uid)
            .or_insert_with(|| (user, Vec::new()))
            .1
            .push(item);
    }

    /// Holds enough that it should be delivered now.
    pub fn full(&self) -> bool {
        self.held > HELD
    }

    pub fn take(&mut self) -> Vec<(Account, Vec<Item>)> {
        self.held = 0;
        std::mem::take(&mut self.users).into_values().collect()
    }
}
