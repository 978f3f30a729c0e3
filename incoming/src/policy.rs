//! Who may send to whom: local recipients must exist, relay domains are open to all, and
//! everything else needs an authenticated or `mynetworks` client. Never an open relay.

use qms_common::aliases::Aliases;
use qms_common::config::Route;
use qms_common::{Address, Config};

/// True when a local-domain address reaches someone: a mailbox, an alias, a route for the
/// exact address, or a login account (not root or a system account: those need an alias;
/// `root` falls back to the `postmaster` alias). `user+tag` is looked up as `user`.
pub fn local_exists(cfg: &Config, aliases: &Aliases, addr: &Address) -> bool {
    let (user, _) = match cfg.recipient_delimiter {
        Some(sep) => addr.split_extension(sep),
        None => (addr.local(), None),
    };
    let base = format!("{}@{}", user.to_lowercase(), addr.domain());
    user.eq_ignore_ascii_case("postmaster")
        || cfg.mailboxes.contains_key(&addr.lookup_key())
        || cfg.mailboxes.contains_key(&base)
        || cfg.routes.contains_key(&addr.lookup_key())
        || cfg.routes.contains_key(&base)
        || aliases.get(user).is_some()
        || aliases.get(&base).is_some()
        || (user.eq_ignore_ascii_case("root") && aliases.get("postmaster").is_some())
        // root, daemons and nobody have no mailbox of their own: only an alias reaches them.
        || qms_common::privs::Account::lookup(&user.to_lowercase())
            .is_ok_and(|a| qms_common::privs::is_mail_account(&a, cfg.user.as_deref()))
}

/// The reply to refuse a recipient with, or None to accept it.
pub fn check_recipient(
    cfg: &Config,
    aliases: &Aliases,
    addr: &Address,
    may_relay: bool,
) -> Option<String> {
    // An `error:` route refuses here, with its text, rather than bouncing later to a sender
    // who may be forged (backscatter).
    let route = cfg.address_route(addr).or_else(|| {
        (!cfg.is_local_domain(addr.domain()))
            .then(|| cfg.domain_route(addr.domain()))
            .flatten()
    });
    // An SRS address of ours is a bounce on its way back to a sender: only a valid one.
    match cfg.srs.as_ref().and_then(|s| s.reverse(addr)) {
        Some(Ok(_)) => return None,
        Some(Err(why)) => return Some(format!("550 5.1.1 <{addr}>: {why}")),
        None => {}
    }
    if let Some(Route::Error(text)) = route {
        let text = if text.is_empty() {
            "refused by the routing table"
        } else {
            text.as_str()
        };
        let clean: String = text.chars().filter(|c| !c.is_control()).collect();
        return Some(format!("550 5.0.0 <{addr}>: {clean}"));
    }
    if cfg.is_local_domain(addr.domain()) {
        if local_exists(cfg, aliases, addr) {
            return None;
        }
        return Some(format!(
            "550 5.1.1 <{addr}>: Recipient address rejected: User unknown"
        ));
    }
    if cfg.is_relay_domain(addr.domain()) || may_relay {
        return None;
    }
    Some(format!("554 5.7.1 <{addr}>: Relay access denied"))
}
