//! Named queues: a route may name the output queue that carries its mail (`"bulk.example" =
//! "smtp@bulk"`, `"lists.example" = "pipe:/usr/bin/list-handler@lists"`), so that each
//! gets workers of its own (`[queues.bulk] workers = 4`). A queue is delivered by the smtp
//! agent when its routes go out by SMTP, else by the local agent; a queue no route names and
//! a route naming a queue that is not defined are configuration errors.

use super::Route;
use std::collections::BTreeMap;

/// Which delivery agent serves a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agent {
    Smtp,
    Local,
}

impl Agent {
    pub fn of(route: &Route) -> Agent {
        match route {
            Route::Smtp | Route::Relay { .. } | Route::Lmtp { .. } | Route::LmtpUnix(_) => {
                Agent::Smtp
            }
            _ => Agent::Local,
        }
    }
}

/// What `[queues.NAME]` sets beside its workers, in place of the `[outgoing]` values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    pub destination_concurrency: Option<usize>,
    pub recipient_limit: Option<usize>,
    pub min_backoff: Option<i64>,
    pub max_backoff: Option<i64>,
}

impl super::Config {
    fn overrides(&self, queue: &str) -> Option<&Overrides> {
        self.queue_overrides.get(queue)
    }

    /// Connections at once to one destination, shared by the queue's workers.
    pub fn destination_concurrency(&self, queue: &str) -> usize {
        self.overrides(queue)
            .and_then(|o| o.destination_concurrency)
            .unwrap_or(self.client.destination_concurrency)
            .max(1)
    }

    /// Recipients in one SMTP transaction.
    pub fn recipient_limit(&self, queue: &str) -> usize {
        self.overrides(queue)
            .and_then(|o| o.recipient_limit)
            .unwrap_or(self.client.recipient_limit)
            .max(1)
    }

    /// The first and the longest wait between attempts, in seconds.
    pub fn backoff_range(&self, queue: &str) -> (i64, i64) {
        let o = self.overrides(queue);
        let min = o
            .and_then(|o| o.min_backoff)
            .unwrap_or(self.outgoing.min_backoff);
        let max = o
            .and_then(|o| o.max_backoff)
            .unwrap_or(self.outgoing.max_backoff);
        (min, max.max(min))
    }
}

/// A route as the routing table gives it, with the queue it names, if any.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Routing<'a> {
    pub route: &'a Route,
    pub queue: Option<&'a str>,
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `smtp@bulk` → (`smtp`, Some(`bulk`)). Only a route that leaves the router names a queue,
/// and a queue name has no dot, so `error:… <a@b.example>` and `pipe:mail x@example.org`
/// keep their `@`.
pub fn split(spec: &str) -> (&str, Option<&str>) {
    let spec = spec.trim();
    if spec.starts_with("error:") || spec == "discard" {
        return (spec, None);
    }
    match spec.rsplit_once('@') {
        Some((route, queue)) if valid_name(queue) && !route.is_empty() => (route, Some(queue)),
        _ => (spec, None),
    }
}

/// Checks the named queues against the routes: every route's queue is defined and served by
/// one kind of agent, every queue beyond the standard ones is named by a route. Returns each
/// queue's agent, or the key and the sentence of the first mistake.
pub fn agents(
    queues: &BTreeMap<String, usize>,
    routes: &BTreeMap<String, Route>,
    route_queues: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, Agent>, (String, String)> {
    let mut agents: BTreeMap<String, Agent> = BTreeMap::from([
        ("incoming".to_string(), Agent::Local),
        ("local".to_string(), Agent::Local),
        ("pipe".to_string(), Agent::Local),
        ("smtp".to_string(), Agent::Smtp),
    ]);
    for (key, queue) in route_queues {
        let Some(route) = routes.get(key) else {
            continue;
        };
        let here = format!("routes.{key:?}");
        if !queues.contains_key(queue) || queue == "incoming" {
            return Err((
                here,
                format!("names the queue {queue:?}, which is not defined (add [queues.{queue}] workers = N)"),
            ));
        }
        let agent = Agent::of(route);
        match agents.insert(queue.clone(), agent) {
            Some(was) if was != agent => {
                return Err((
                    here,
                    format!("the queue {queue:?} would be served by both the smtp and the local agent: give each kind of route a queue of its own"),
                ))
            }
            _ => {}
        }
    }
    if let Some(orphan) = queues.keys().find(|q| !agents.contains_key(*q)) {
        return Err((
            format!("queues.{orphan}"),
            format!("no route names this queue, so its workers would never get mail (name it in a route: \"example.org\" = \"smtp@{orphan}\")"),
        ));
    }
    Ok(agents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_suffixes() {
        assert_eq!(split("smtp@bulk"), ("smtp", Some("bulk")));
        assert_eq!(
            split("smtp:[relay.example]:25@outbound"),
            ("smtp:[relay.example]:25", Some("outbound"))
        );
        assert_eq!(
            split("pipe:/usr/bin/list-handler@lists"),
            ("pipe:/usr/bin/list-handler", Some("lists"))
        );
        assert_eq!(
            split("pipe:mail -s x a@example.org"),
            ("pipe:mail -s x a@example.org", None)
        );
        assert_eq!(
            split("error:5.1.1 <a@b>: gone"),
            ("error:5.1.1 <a@b>: gone", None)
        );
        assert_eq!(split("smtp"), ("smtp", None));
    }
}
