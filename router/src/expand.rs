//! Recipient expansion: aliases (nested, `:include:`, files, programs) with loop detection
//! and a depth limit, then mailboxes, system users and the routing table.

use qms_common::aliases::{self, Aliases, Target};
use qms_common::config::{Mailbox, Route};
use qms_common::{Address, Config};
use std::collections::HashSet;

const MAX_DEPTH: usize = 20;

pub enum Dest {
    Queue {
        queue: String,
        route: String,
        user: Option<String>,
    },
    Discard,
    Fail(String),
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
        let mut push = |dest: Dest| {
            out.push(Expanded {
                addr: addr.clone(),
                dest,
                owner: owner.cloned(),
            })
        };
        if let Some(route) = self.cfg.address_route(addr) {
            push(self.route_dest(addr, route));
            return;
        }
        let local = self.cfg.is_local_domain(addr.domain());
        let (user, _ext) = match self.cfg.recipient_delimiter {
            Some(sep) => addr.split_extension(sep),
            None => (addr.local(), None),
        };
        // An alias that names itself (`alice: alice, bob`) delivers to the user: expand once.
        let targets = if local && first_visit {
            self.aliases
                .get(&format!("{}@{}", user.to_lowercase(), addr.domain()))
                .or_else(|| self.aliases.get(user))
        } else {
            None
        };
        let Some(targets) = targets else {
            push(self.final_dest(addr, local));
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
        self.targets(
            addr,
            &targets,
            depth,
            list_owner.as_ref().or(owner),
            seen,
            out,
        );
    }

    fn targets(
        &self,
        list: &Address,
        targets: &[Target],
        depth: usize,
        owner: Option<&Address>,
        seen: &mut HashSet<String>,
        out: &mut Vec<Expanded>,
    ) {
        let user = self.system_user(list);
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
                Target::File(p) => push(
                    out,
                    Dest::Queue {
                        queue: "local".into(),
                        route: format!("file:{p}"),
                        user: user.clone(),
                    },
                ),
                Target::Command(c) => push(
                    out,
                    Dest::Queue {
                        queue: "local".into(),
                        route: format!("pipe:{c}"),
                        user: user.clone(),
                    },
                ),
                Target::Include(p) => match std::fs::read_to_string(p) {
                    Ok(text) => {
                        let entries: Vec<Target> = text
                            .lines()
                            .map(str::trim)
                            .filter(|l| !l.is_empty() && !l.starts_with('#'))
                            .flat_map(|l| aliases::parse_targets(l).unwrap_or_default())
                            .collect();
                        self.targets(list, &entries, depth + 1, owner, seen, out);
                    }
                    Err(e) => push(
                        out,
                        Dest::Fail(format!("4.3.0 cannot read include file {p}: {e}")),
                    ),
                },
            }
        }
    }

    /// The user that deliveries for alias files and programs run as: the owner of the alias
    /// when it is a system user, else the configured unprivileged user.
    fn system_user(&self, addr: &Address) -> Option<String> {
        let name = addr.local().to_lowercase();
        nix::unistd::User::from_name(&name)
            .ok()
            .flatten()
            .filter(|u| !u.uid.is_root())
            .map(|u| u.name)
            .or_else(|| self.cfg.user.clone())
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
            return Dest::Queue {
                queue: "local".into(),
                route,
                user: m.user.clone(),
            };
        }
        if local {
            if let Some(pw) = nix::unistd::User::from_name(&user.to_lowercase())
                .ok()
                .flatten()
            {
                let dir = pw.dir.join("Maildir");
                return Dest::Queue {
                    queue: "local".into(),
                    route: format!("maildir:{}/", dir.display()),
                    user: Some(pw.name),
                };
            }
            return Dest::Fail(format!("5.1.1 <{addr}>: user unknown"));
        }
        match self.cfg.domain_route(addr.domain()) {
            Some(route) => self.route_dest(addr, route),
            None => Dest::Queue {
                queue: "smtp".into(),
                route: "smtp".into(),
                user: None,
            },
        }
    }

    fn route_dest(&self, addr: &Address, route: &Route) -> Dest {
        match route {
            Route::Local => self.final_dest(addr, true),
            Route::Discard => Dest::Discard,
            Route::Error(text) => Dest::Fail(if text.is_empty() {
                "5.0.0 refused by the routing table".into()
            } else {
                format!("5.0.0 {text}")
            }),
            Route::Smtp | Route::Relay { .. } | Route::Pipe(_) => Dest::Queue {
                queue: route.queue().unwrap_or("smtp").into(),
                route: route.to_string(),
                user: self
                    .cfg
                    .user
                    .clone()
                    .filter(|_| matches!(route, Route::Pipe(_))),
            },
        }
    }
}
