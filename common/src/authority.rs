//! Which envelope senders a submitter may use: an authenticated user their own name at a
//! local domain and what `[auth] senders` gives them; a local user their own address unless
//! trusted. The same rules hold on every listener and for the tracked-sending fields.

use crate::{Address, Config};

/// True when `user` may use `sender` as envelope sender on submission: their own name at a
/// local domain, their own address, or what `[auth] senders` grants.
pub fn may_send_as(cfg: &Config, user: &str, sender: &Address) -> bool {
    let (local, _) = match cfg.recipient_delimiter {
        Some(sep) => sender.split_extension(sep),
        None => (sender.local(), None),
    };
    let own = if user.contains('@') {
        sender.lookup_key() == user.to_lowercase()
            || format!("{}@{}", local.to_lowercase(), sender.domain()) == user.to_lowercase()
    } else {
        local.eq_ignore_ascii_case(user) && cfg.is_local_domain(sender.domain())
    };
    own || cfg.auth.senders.get(user).is_some_and(|list| {
        list.iter().any(|a| match a.strip_prefix('@') {
            Some(domain) => sender.domain().eq_ignore_ascii_case(domain),
            None => a.eq_ignore_ascii_case(&sender.to_string()),
        })
    })
}

/// True when a local user (who ran `sendmail`) may use `sender`: root and `trusted_users`
/// any address, everyone else only their own at a local domain.
pub fn local_user_may_send_as(cfg: &Config, user: &str, sender: &Address) -> bool {
    user == "root"
        || cfg.trusted_users.iter().any(|t| t == user)
        || (sender.local().eq_ignore_ascii_case(user) && cfg.is_local_domain(sender.domain()))
}
