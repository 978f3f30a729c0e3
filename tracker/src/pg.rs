//! The tracking database of a fleet: PostgreSQL, shared by every node's tracker, `qms
//! track`, dsnproc and the router's suppression check. The same tables as SQLite plus the
//! node of each event and file; the schema is versioned and brought up to date (under an
//! advisory lock) by whichever process connects first. A connection that breaks is made
//! again at the next call, so a node rides out a database restart: its events wait in its
//! files meanwhile.

use crate::suppress::{added, auto_reason, Suppressed};
use crate::{history_sql, Arg, Chunk, NodeLag, Query, Store};
use postgres::types::ToSql;
use postgres::{Client, Transaction};
use qms_common::track::Event;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The schema, one step per version; a step is never changed once released.
const MIGRATIONS: &[&str] = &["CREATE TABLE events (
        id BIGSERIAL PRIMARY KEY, node TEXT NOT NULL, time BIGINT NOT NULL, qid TEXT NOT NULL,
        message_id TEXT, recipient TEXT NOT NULL, event TEXT NOT NULL, state_from TEXT NOT NULL,
        state_to TEXT NOT NULL, reply TEXT, relay TEXT, attempt INTEGER, role TEXT,
        crossref TEXT, reason TEXT);
     CREATE INDEX events_qid ON events(qid);
     CREATE INDEX events_message_id ON events(message_id);
     CREATE INDEX events_recipient ON events(lower(recipient));
     CREATE INDEX events_crossref ON events(crossref);
     CREATE INDEX events_time ON events(time);
     CREATE TABLE files (node TEXT NOT NULL, name TEXT NOT NULL, read_to BIGINT NOT NULL,
        PRIMARY KEY (node, name));
     CREATE TABLE suppressed (address TEXT PRIMARY KEY, reason TEXT NOT NULL,
        source TEXT NOT NULL, qid TEXT, time BIGINT NOT NULL);
     CREATE TABLE nodes (node TEXT PRIMARY KEY, lag DOUBLE PRECISION NOT NULL,
        updated BIGINT NOT NULL);"];

/// Any key of ours, so two processes never migrate at once.
const MIGRATION_LOCK: i64 = 0x716d_7374;

/// The error with its causes ("error performing TLS handshake: invalid peer certificate:
/// UnknownIssuer"), as the driver's own text names only the first.
fn err(e: postgres::Error) -> String {
    let mut text = format!("tracking database (PostgreSQL): {e}");
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

pub(crate) struct Pg {
    config: postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    password_file: Option<PathBuf>,
    client: Option<Client>,
}

impl Pg {
    pub(crate) fn connect(
        url: &str,
        password_file: Option<&Path>,
        ca_file: Option<&Path>,
    ) -> Result<Pg, String> {
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| format!("[tracking] database: {e}"))?;
        config.connect_timeout(Duration::from_secs(10));
        config.application_name("qms");
        let roots = qms_common::tls::roots(ca_file)?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut pg = Pg {
            config,
            tls: tokio_postgres_rustls::MakeRustlsConnect::new(tls),
            password_file: password_file.map(Path::to_path_buf),
            client: None,
        };
        pg.client()?;
        Ok(pg)
    }

    /// The connection, made (again) when there is none or it broke.
    fn client(&mut self) -> Result<&mut Client, String> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            let mut config = self.config.clone();
            // Read at each connection, so a changed password needs no restart.
            let password = match &self.password_file {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .map_err(|e| format!("cannot read {}: {e}", f.display()))?
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string(),
                ),
                None => std::env::var("PGPASSWORD").ok(),
            };
            if let Some(p) = password {
                // Credentials travel only over verified TLS, unless the server is on this
                // host.
                if !on_this_host(&config) {
                    config.ssl_mode(postgres::config::SslMode::Require);
                }
                config.password(p);
            }
            let mut client = config.connect(self.tls.clone()).map_err(err)?;
            migrate(&mut client)?;
            self.client = Some(client);
        }
        self.client
            .as_mut()
            .ok_or_else(|| "no database connection".to_string())
    }
}

/// Whether every host of the URL is this machine (loopback, or a Unix socket).
fn on_this_host(config: &postgres::Config) -> bool {
    config.get_hosts().iter().all(|h| match h {
        postgres::config::Host::Unix(_) => true,
        postgres::config::Host::Tcp(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    })
}

fn migrate(client: &mut Client) -> Result<(), String> {
    let mut tx = client.transaction().map_err(err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        .map_err(err)?;
    let version: i32 = tx
        .query_opt("SELECT version FROM schema_version", &[])
        .map_err(err)?
        .map_or(0, |r| r.get(0));
    if version as usize >= MIGRATIONS.len() {
        return tx.commit().map_err(err);
    }
    for step in &MIGRATIONS[version as usize..] {
        tx.batch_execute(step).map_err(err)?;
    }
    let now = MIGRATIONS.len() as i32;
    if version == 0 {
        tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&now])
    } else {
        tx.execute("UPDATE schema_version SET version = $1", &[&now])
    }
    .map_err(err)?;
    tx.commit().map_err(err)?;
    qms_common::qlog!("status=migrated database=postgresql schema_version={now}");
    Ok(())
}

/// See `sqlite::add_auto`: a report from outside counts only for an address the message was
/// sent to.
fn add_auto(tx: &mut Transaction, ev: &Event, reason: &str) -> Result<bool, String> {
    if ev.role.starts_with("dsnproc") {
        let sent: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM events WHERE qid = $1 AND lower(recipient) = lower($2)
                 AND event IN ('received', 'routed', 'relayed', 'delivered'))",
                &[&ev.qid, &ev.recipient],
            )
            .map_err(err)?
            .get(0);
        if !sent {
            return Ok(false);
        }
    }
    tx.execute(
        "INSERT INTO suppressed (address, reason, source, qid, time) VALUES ($1, $2, 'auto', $3, $4)
         ON CONFLICT (address) DO NOTHING",
        &[
            &crate::suppress::key(&ev.recipient),
            &reason,
            &ev.qid,
            &((ev.time / 1_000_000) as i64),
        ],
    )
    .map_err(err)?;
    Ok(true)
}

/// One batch of events as arrays, for one `INSERT … SELECT FROM UNNEST`.
#[derive(Default)]
struct Columns {
    time: Vec<i64>,
    qid: Vec<String>,
    message_id: Vec<Option<String>>,
    recipient: Vec<String>,
    event: Vec<String>,
    from: Vec<String>,
    to: Vec<String>,
    reply: Vec<Option<String>>,
    relay: Vec<Option<String>>,
    attempt: Vec<Option<i32>>,
    role: Vec<String>,
    crossref: Vec<Option<String>>,
    reason: Vec<Option<String>>,
}

impl Columns {
    fn push(&mut self, ev: &Event) {
        self.time.push(ev.time as i64);
        self.qid.push(ev.qid.clone());
        self.message_id.push(ev.message_id.clone());
        self.recipient.push(ev.recipient.clone());
        self.event.push(ev.event.clone());
        self.from.push(ev.from.clone());
        self.to.push(ev.to.clone());
        self.reply.push(ev.reply.clone());
        self.relay.push(ev.relay.clone());
        self.attempt.push(ev.attempt.map(|a| a as i32));
        self.role.push(ev.role.clone());
        self.crossref.push(ev.crossref.clone());
        self.reason.push(ev.reason.clone());
    }
}

impl Store for Pg {
    fn offsets(&mut self, node: &str) -> Result<HashMap<String, u64>, String> {
        let rows = self
            .client()?
            .query("SELECT name, read_to FROM files WHERE node = $1", &[&node])
            .map_err(err)?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
            .collect())
    }

    fn commit(
        &mut self,
        node: &str,
        chunks: &[Chunk],
        auto: &[String],
        lag: Option<f64>,
    ) -> Result<usize, String> {
        let mut cols = Columns::default();
        for ev in chunks.iter().flat_map(|c| &c.events) {
            cols.push(ev);
        }
        let mut tx = self.client()?.transaction().map_err(err)?;
        if !cols.time.is_empty() {
            let c = &cols;
            let params: [&(dyn ToSql + Sync); 14] = [
                &node,
                &c.time,
                &c.qid,
                &c.message_id,
                &c.recipient,
                &c.event,
                &c.from,
                &c.to,
                &c.reply,
                &c.relay,
                &c.attempt,
                &c.role,
                &c.crossref,
                &c.reason,
            ];
            tx.execute(
                "INSERT INTO events (node, time, qid, message_id, recipient, event, state_from, state_to, reply, relay, attempt, role, crossref, reason)
                 SELECT $1::text, * FROM UNNEST($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::int[], $12::text[], $13::text[], $14::text[])",
                &params,
            )
            .map_err(err)?;
        }
        for ev in chunks.iter().flat_map(|c| &c.events) {
            if let Some(why) = auto_reason(ev, auto) {
                added(ev, &why, add_auto(&mut tx, ev, &why));
            }
        }
        for c in chunks {
            tx.execute(
                "INSERT INTO files (node, name, read_to) VALUES ($1, $2, $3)
                 ON CONFLICT (node, name) DO UPDATE SET read_to = EXCLUDED.read_to",
                &[&node, &c.name, &(c.offset as i64)],
            )
            .map_err(err)?;
        }
        if let Some(lag) = lag {
            tx.execute(
                "INSERT INTO nodes (node, lag, updated) VALUES ($1, $2, $3)
                 ON CONFLICT (node) DO UPDATE SET lag = EXCLUDED.lag, updated = EXCLUDED.updated",
                &[&node, &lag, &qms_common::time::now()],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(cols.time.len())
    }

    fn forget(&mut self, node: &str, name: &str) -> Result<(), String> {
        self.client()?
            .execute(
                "DELETE FROM files WHERE node = $1 AND name = $2",
                &[&node, &name],
            )
            .map(|_| ())
            .map_err(err)
    }

    fn lags(&mut self) -> Result<Vec<NodeLag>, String> {
        let rows = self
            .client()?
            .query("SELECT node, lag, updated FROM nodes ORDER BY node", &[])
            .map_err(err)?;
        Ok(rows
            .iter()
            .map(|r| NodeLag {
                node: r.get(0),
                lag: r.get(1),
                updated: r.get(2),
            })
            .collect())
    }

    fn prune(&mut self, cutoff_micros: i64) -> Result<usize, String> {
        self.client()?
            .execute("DELETE FROM events WHERE time < $1", &[&cutoff_micros])
            .map(|n| n as usize)
            .map_err(err)
    }

    fn find_message(&mut self, key: &str) -> Result<Option<(String, Option<String>)>, String> {
        let row = self
            .client()?
            .query_opt(
                "SELECT qid, message_id FROM events WHERE qid = $1 OR message_id = $1 OR crossref = $1 ORDER BY time LIMIT 1",
                &[&key],
            )
            .map_err(err)?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    fn has_event(
        &mut self,
        message_id: &str,
        recipient: &str,
        event: &str,
    ) -> Result<bool, String> {
        self.client()?
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM events WHERE message_id = $1 AND lower(recipient) = lower($2) AND event = $3)",
                &[&message_id, &recipient, &event],
            )
            .map(|r| r.get(0))
            .map_err(err)
    }

    fn history(&mut self, q: &Query) -> Result<Vec<Event>, String> {
        let (mut sql, args) = history_sql(q, |n| format!("${n}"));
        sql.push_str(" ORDER BY recipient, time, id");
        let owned: Vec<Box<dyn ToSql + Sync>> = args
            .into_iter()
            .map(|a| -> Box<dyn ToSql + Sync> {
                match a {
                    Arg::Text(t) => Box::new(t),
                    Arg::Int(i) => Box::new(i),
                }
            })
            .collect();
        let params: Vec<&(dyn ToSql + Sync)> = owned.iter().map(|b| b.as_ref()).collect();
        let rows = self.client()?.query(&sql, &params).map_err(err)?;
        Ok(rows
            .iter()
            .map(|r| Event {
                time: r.get::<_, i64>(0) as u64,
                qid: r.get(1),
                message_id: r.get(2),
                recipient: r.get(3),
                event: r.get(4),
                from: r.get(5),
                to: r.get(6),
                reply: r.get(7),
                relay: r.get(8),
                attempt: r.get::<_, Option<i32>>(9).map(|a| a as u32),
                role: r.get::<_, Option<String>>(10).unwrap_or_default(),
                crossref: r.get(11),
                reason: r.get(12),
                node: r.get(13),
            })
            .collect())
    }

    fn suppress(&mut self, address: &str, reason: &str) -> Result<(), String> {
        self.client()?
            .execute(
                "INSERT INTO suppressed (address, reason, source, qid, time) VALUES ($1, $2, 'manual', NULL, $3)
                 ON CONFLICT (address) DO UPDATE SET reason = EXCLUDED.reason, source = 'manual', qid = NULL, time = EXCLUDED.time",
                &[&address, &reason, &qms_common::time::now()],
            )
            .map(|_| ())
            .map_err(err)
    }

    fn unsuppress(&mut self, address: &str) -> Result<bool, String> {
        self.client()?
            .execute("DELETE FROM suppressed WHERE address = $1", &[&address])
            .map(|n| n > 0)
            .map_err(err)
    }

    fn suppressed(&mut self, address: &str) -> Result<Option<Suppressed>, String> {
        let row = self
            .client()?
            .query_opt(
                "SELECT address, reason, source, qid, time FROM suppressed WHERE address = $1",
                &[&address],
            )
            .map_err(err)?;
        Ok(row.map(|r| suppressed_row(&r)))
    }

    fn suppression_list(&mut self) -> Result<Vec<Suppressed>, String> {
        let rows = self
            .client()?
            .query(
                "SELECT address, reason, source, qid, time FROM suppressed ORDER BY address",
                &[],
            )
            .map_err(err)?;
        Ok(rows.iter().map(suppressed_row).collect())
    }
}

fn suppressed_row(r: &postgres::Row) -> Suppressed {
    Suppressed {
        address: r.get(0),
        reason: r.get(1),
        source: r.get(2),
        qid: r.get(3),
        time: r.get(4),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_to_another_host_needs_tls() {
        let local: postgres::Config = "postgresql://qms@127.0.0.1/qms".parse().unwrap();
        let socket: postgres::Config = "host=/run/postgresql user=qms".parse().unwrap();
        let remote: postgres::Config = "postgresql://qms@db.example/qms".parse().unwrap();
        assert!(on_this_host(&local) && on_this_host(&socket));
        assert!(!on_this_host(&remote));
    }
}
