//! Recipient expansion: aliases (nested, `:include:`, files, programs) with loop detection
//! and a depth limit, then mailboxes, system users and the routing table.
//!
//! The router uses it to route; local delivery uses it again before it runs anything, so a
//! job file can never name a command, a file or a user that the config and aliases do not.
//! Who a command or file delivery runs as comes from here: the owner of the `:include:`
//! file that named it, `default_privs` for the aliases file and root-owned include files.

use crate::aliases::{self, Aliases, Target};
use crate::config::{Mailbox, Origin, Route, Routing};
use crate::privs::{self, Account};
use crate::{Address, Config};
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;

const MAX_DEPTH: usize = 20;

pub enum Dest {
    Queue {
        queue: String,
        route: String,
        user: Option<String>,
    },
    Discard,
    /// Refused for good: the text starts with a 5.x.x status.
    Fail(String),
    /// A configuration problem that a sysadmin can fix: try again later (4.x.x status).
    Defer(String),
}

pub struct Expanded {
    pub addr: Address,
    pub dest: Dest,
    /// `owner-LIST@domain` when a list with an owner alias was expanded on the way here.
    pub owner: Option<Address>,
}

pub struct Expander<'a> {
    cfg: &'a Config,
    aliases: &'a Aliases,
}

impl<'a> Expander<'a> {
    pub fn new(cfg: &'a Config, aliases: &'a Aliases) -> Expander<'a> {
        Expander { cfg, aliases }
    }

    /// Every final address, where it goes, and the envelope sender it gets when a list with
    /// an `owner-` alias was expanded on the way; duplicates removed.
    pub fn expand(&mut self, addr: &Address) -> Vec<Expanded> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        self.walk(addr, 0, None, &mut seen, &mut out);
        out
    }

    /// Where `addr` goes when no alias names it: its one destination; None when an alias
    /// does (expanding it may read files and give many). smtpd's direct route asks this.
    pub fn direct(&self, addr: &Address) -> Option<Dest> {
        if self
            .cfg
            .srs
            .as_ref()
            .and_then(|s| s.reverse(addr))
            .is_some()
        {
            return None;
        }
        if let Some(routing) = self.cfg.address_routing(addr) {
            return Some(self.route_dest(addr, routing));
        }
        let local = self.cfg.is_local_domain(addr.domain());
        if self.alias_of(addr, local).is_some() {
            return None;
        }
        Some(self.final_dest(addr, local))
    }

    /// The local part without its extension (`user+tag` → `user`).
    fn user_of<'x>(&self, addr: &'x Address) -> &'x str {
        match self.cfg.recipient_delimiter {
            Some(sep) => addr.split_extension(sep).0,
            None => addr.local(),
        }
    }

    /// The alias that names `addr`, for an address at a local domain.
    fn alias_of(&self, addr: &Address, local: bool) -> Option<&'a [Target]> {
        if !local {
            return None;
        }
        let user = self.user_of(addr);
        self.aliases
            .get(&format!("{}@{}", user.to_lowercase(), addr.domain()))
            .or_else(|| self.aliases.get(user))
            // Mail to root reaches whoever reads the postmaster's mail.
            .or_else(|| {
                user.eq_ignore_ascii_case("root")
                    .then(|| self.aliases.get("postmaster"))
                    .flatten()
            })
    }

    fn walk(
        &self,
        addr: &Address,
        depth: usize,
        owner: Option<&Address>,
        seen: &mut HashSet<String>,
        out: &mut Vec<Expanded>,
    ) {
        let key = addr.lookup_key();
        let first_visit = seen.insert(key.clone());
        if !first_visit && out.iter().any(|e| e.addr.lookup_key() == key) {
            return;
        }
        // A bounce to an SRS address of ours goes back to the sender it wraps.
        if let Some(back) = self.cfg.srs.as_ref().and_then(|s| s.reverse(addr)) {
            match back {
                Ok(orig) => self.walk(&orig, depth + 1, owner, seen, out),
                Err(why) => out.push(Expanded {
                    addr: addr.clone(),
                    dest: Dest::Fail(format!("5.1.1 <{addr}>: {why}")),
                    owner: owner.cloned(),
                }),
            }
            return;
        }
        let mut push = |dest: Dest| {
            out.push(Expanded {
                addr: addr.clone(),
                dest,
                owner: owner.cloned(),
            })
        };
        if let Some(routing) = self.cfg.address_routing(addr) {
            push(self.route_dest(addr, routing));
            return;
        }
        let local = self.cfg.is_local_domain(addr.domain());
        let user = self.user_of(addr);
        // An alias that names itself (`alice: alice, bob`) delivers to the user: expand once.
        let alias = self.alias_of(addr, local);
        let targets = alias.filter(|_| first_visit);
        let Some(targets) = targets else {
            match self.final_dest(addr, local) {
                // Back at an alias that is no mailbox of its own: the aliases go round.
                Dest::Fail(_) if alias.is_some() => push(Dest::Fail(format!(
                    "5.4.6 <{addr}>: mail forwarding loop (its aliases lead back to it)"
                ))),
                dest => push(dest),
            }
            return;
        };
        if depth >= MAX_DEPTH {
            push(Dest::Fail(format!(
                "5.4.6 alias expansion of {addr} is nested too deep (loop?)"
            )));
            return;
        }
        // Bounces of a list go to its owner (sendmail and Postfix habit).
        let owner_name = format!("owner-{}", user.to_lowercase());
        let list_owner = self
            .aliases
            .get(&owner_name)
            .and_then(|_| Address::new(&owner_name, addr.domain()).ok());
        let targets = targets.to_vec();
        let from = Source {
            origin: Origin::Alias,
            run_as: self.cfg.local.default_privs.clone(),
        };
        self.targets(
            addr,
            &targets,
            &from,
            depth,
            list_owner.as_ref().or(owner),
            seen,
            out,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn targets(
        &self,
        list: &Address,
        targets: &[Target],
        from: &Source,
        depth: usize,
        owner: Option<&Address>,
        seen: &mut HashSet<String>,
        out: &mut Vec<Expanded>,
    ) {
        let push = |out: &mut Vec<Expanded>, dest: Dest| {
            out.push(Expanded {
                addr: list.clone(),
                dest,
                owner: owner.cloned(),
            })
        };
        for t in targets {
            match t {
                Target::Address(a) => {
                    let full = if a.contains('@') {
                        a.clone()
                    } else {
                        format!("{a}@{}", list.domain())
                    };
                    match Address::parse(&full) {
                        Ok(next) => self.walk(&next, depth + 1, owner, seen, out),
                        Err(e) => push(
                            out,
                            Dest::Fail(format!("5.1.3 bad alias target {a:?}: {e}")),
                        ),
                    }
                }
                Target::File(p) => {
                    let allowed = self.cfg.local.allow_mail_to_files.contains(&from.origin);
                    push(out, from.dest(allowed, "files", format!("file:{p}")))
                }
                Target::Command(c) => {
                    let allowed = self.cfg.local.allow_mail_to_commands.contains(&from.origin);
                    push(out, from.dest(allowed, "commands", format!("pipe:{c}")))
                }
                Target::Include(p) => match self.include(p) {
                    Ok((entries, inner)) => {
                        self.targets(list, &entries, &inner, depth + 1, owner, seen, out)
                    }
                    Err(why) => push(out, Dest::Defer(why)),
                },
            }
        }
    }

    /// Reads an `:include:` file; its commands and files run as its owner (as
    /// `default_privs` when root owns it). A file that cannot be read defers: the sysadmin
    /// can fix it, and nothing is lost meanwhile. Its owner may have made it anything: it
    /// must be a regular file (a FIFO would keep the router waiting for a writer), and not
    /// the mail system's user's own (a link into the spool would have its lines read, and its
    /// commands run, as qms).
    fn include(&self, path: &str) -> Result<(Vec<Target>, Source), String> {
        use std::os::unix::fs::OpenOptionsExt;
        let read = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .and_then(|f| {
                let meta = f.metadata()?;
                if !meta.is_file() {
                    return Ok((meta, None));
                }
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::Read::take(&f, 16 << 20), &mut text)?;
                Ok((meta, Some(text)))
            });
        let (meta, text) = read.map_err(|e| {
            format!("4.3.5 cannot read include file {path}: {e} (fix the file or its permissions)")
        })?;
        let Some(text) = text else {
            return Err(format!("4.3.5 include file {path} is not a regular file"));
        };
        if privs::is_mail_system_user(self.cfg, nix::unistd::Uid::from_raw(meta.uid())) {
            return Err(format!(
                "4.3.5 include file {path} belongs to the mail system's user; it must belong to the list's owner or root"
            ));
        }
        let run_as = match Account::by_uid(nix::unistd::Uid::from_raw(meta.uid())) {
            Some(a) if !a.uid.is_root() => a.name,
            Some(_) => self.cfg.local.default_privs.clone(),
            None => {
                return Err(format!(
                    "4.3.5 include file {path} belongs to uid {}, which has no account",
                    meta.uid()
                ))
            }
        };
        let entries = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .flat_map(|l| aliases::parse_targets(l).unwrap_or_default())
            .collect();
        Ok((
            entries,
            Source {
                origin: Origin::Include,
                run_as,
            },
        ))
    }

    fn final_dest(&self, addr: &Address, local: bool) -> Dest {
        let (user, _) = match self.cfg.recipient_delimiter {
            Some(sep) => addr.split_extension(sep),
            None => (addr.local(), None),
        };
        let base = format!("{}@{}", user.to_lowercase(), addr.domain());
        if let Some(m) = self
            .cfg
            .mailboxes
            .get(&addr.lookup_key())
            .or_else(|| self.cfg.mailboxes.get(&base))
        {
            let route = match &m.mailbox {
                Mailbox::Maildir(p) => format!("maildir:{}", p.display()),
                Mailbox::Mbox(p) => format!("mbox:{}", p.display()),
            };
            if let Some(u) = m.user.as_deref().filter(|u| Account::lookup(u).is_err()) {
                return Dest::Defer(format!(
                    "4.3.5 the owner {u:?} of the mailbox of {addr} does not exist (fix [mailboxes] in the config)"
                ));
            }
            return Dest::Queue {
                queue: "local".into(),
                route,
                user: m.user.clone(),
            };
        }
        if local {
            return match Account::lookup(&user.to_lowercase()) {
                Ok(a) if privs::is_mail_account(&a, self.cfg.user.as_deref()) => {
                    let dir = a.home.join("Maildir");
                    Dest::Queue {
                        queue: "local".into(),
                        route: format!("maildir:{}/", dir.display()),
                        user: Some(a.name),
                    }
                }
                // root, daemons, nobody: only an alias (`root: admin`) delivers for them.
                _ => Dest::Fail(format!("5.1.1 <{addr}>: user unknown")),
            };
        }
        match self.cfg.domain_routing(addr.domain()) {
            Some(routing) => self.route_dest(addr, routing),
            None => Dest::Queue {
                queue: "smtp".into(),
                route: "smtp".into(),
                user: None,
            },
        }
    }

    fn route_dest(&self, addr: &Address, routing: Routing) -> Dest {
        let route = routing.route;
        let dest = self.route_dest_in_own_queue(addr, route);
        match (dest, routing.queue) {
            (Dest::Queue { route, user, .. }, Some(q)) => Dest::Queue {
                queue: q.to_string(),
                route,
                user,
            },
            (dest, _) => dest,
        }
    }

    /// Where a route leads, in the standard queue of its kind.
    fn route_dest_in_own_queue(&self, addr: &Address, route: &Route) -> Dest {
        match route {
            Route::Local => self.final_dest(addr, true),
            Route::Discard => Dest::Discard,
            Route::Error(text) => Dest::Fail(if text.is_empty() {
                "5.0.0 refused by the routing table".into()
            } else {
                format!("5.0.0 {text}")
            }),
            // A pipe in the routing table runs as default_privs, never as qms's own user.
            Route::Smtp
            | Route::Relay { .. }
            | Route::Lmtp { .. }
            | Route::LmtpUnix(_)
            | Route::Pipe(_) => Dest::Queue {
                queue: route.queue().unwrap_or("smtp").into(),
                route: route.to_string(),
                user: matches!(route, Route::Pipe(_)).then(|| self.cfg.local.default_privs.clone()),
            },
        }
    }
}

/// Where a command or file target was named, and so whom it runs as.
struct Source {
    origin: Origin,
    run_as: String,
}

impl Source {
    fn dest(&self, allowed: bool, what: &str, route: String) -> Dest {
        if !allowed {
            let origin = match self.origin {
                Origin::Alias => "alias",
                Origin::Forward => "forward",
                Origin::Include => "include",
            };
            return Dest::Fail(format!(
                "5.7.1 mail to {what} is restricted (allow_mail_to_{what} does not allow {origin})"
            ));
        }
        Dest::Queue {
            queue: "local".into(),
            route,
            user: Some(self.run_as.clone()),
        }
    }
}
