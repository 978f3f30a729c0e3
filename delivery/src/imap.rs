//! Fetches the reports waiting in a remote IMAP mailbox (`[tracking.imap]`) into the envelope
//! Maildir, where `dsnproc` reads them like locally delivered ones: for sites whose bounces
//! land at a mail provider.
//!
//! IMAPS only (TLS from the first byte), with the server's certificate checked against the
//! system's roots or `ca_file`; the password is read from its file at each poll and goes
//! nowhere but the LOGIN command. A message is written to the Maildir and synced before it
//! is flagged \Seen on the server, under a name made of UIDVALIDITY and UID, so a crash in
//! between fetches it again under the same name instead of recording it twice.

use qms_common::config::Imap;
use qms_common::log::quote;
use qms_common::qlog;
use qms_common::safeio;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Messages fetched per UID FETCH.
const CHUNK: usize = 50;

/// The most of one message fetched. Anyone can send mail to the reports address, so a
/// message there may be of any size; a report is small and comes first in its message (RFC
/// 3462), so the head of a large one still tells what happened, and a fetch holds at most
/// `CHUNK` times this in memory.
const MAX_FETCH: usize = 256 << 10;

fn connect(imap: &Imap) -> Result<StreamOwned<ClientConnection, TcpStream>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(qms_common::tls::roots(imap.ca_file.as_deref())?)
        .with_no_client_auth();
    let name = ServerName::try_from(imap.host.clone())
        .map_err(|_| format!("{:?} is not a host name", imap.host))?;
    let addr = (imap.host.as_str(), imap.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", imap.host))?
        .next()
        .ok_or_else(|| format!("{} has no address", imap.host))?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(30))
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(120)));
    let _ = tcp.set_write_timeout(Some(Duration::from_secs(120)));
    let conn = ClientConnection::new(Arc::new(cfg), name).map_err(|e| e.to_string())?;
    Ok(StreamOwned::new(conn, tcp))
}

/// Fetches the unseen messages of the mailbox into `maildir/new`; returns how many.
pub fn poll(imap: &Imap, maildir: &Path) -> Result<usize, String> {
    let password = std::fs::read_to_string(&imap.password_file)
        .map_err(|e| format!("cannot read {}: {e}", imap.password_file.display()))?;
    let password = password.trim_end_matches(['\r', '\n']);
    let where_ = format!("{}:{}", imap.host, imap.port);
    let fail = |e: imap::Error| format!("{where_}: {e}");
    let mut client = imap::Client::new(connect(imap)?);
    client.read_greeting().map_err(fail)?;
    let mut session = client
        .login(&imap.user, password)
        .map_err(|(e, _)| format!("{where_}: login as {} failed: {e}", imap.user))?;
    let mailbox = session.select(&imap.mailbox).map_err(fail)?;
    let validity = mailbox.uid_validity.unwrap_or(0);
    let mut uids: Vec<u32> = session
        .uid_search("UNSEEN")
        .map_err(fail)?
        .into_iter()
        .collect();
    uids.sort_unstable();
    let mut fetched = 0;
    for chunk in uids.chunks(CHUNK) {
        let set: Vec<String> = chunk.iter().map(u32::to_string).collect();
        let set = set.join(",");
        let messages = session
            .uid_fetch(&set, format!("(RFC822.SIZE BODY.PEEK[]<0.{MAX_FETCH}>)"))
            .map_err(fail)?;
        for m in messages.iter() {
            let (Some(uid), Some(body)) = (m.uid, m.body()) else {
                continue;
            };
            let name = format!("imap.{validity}.{uid}.{}", imap.host);
            if let Some(size) = m.size.filter(|&size| size as usize > body.len()) {
                let why = format!("{size} bytes on {where_}, cut at {MAX_FETCH} bytes");
                qlog!("file={name} status=cut reason={}", quote(&why));
            }
            let seen = maildir.join("cur").join(format!("{name}:2,S"));
            let new = maildir.join("new").join(&name);
            if seen.exists() || new.exists() {
                continue; // fetched before a crash kept us from flagging it
            }
            safeio::write_atomic(maildir.join("tmp").join(&name), new, body)
                .map_err(|e| format!("cannot write {name} into {}: {e}", maildir.display()))?;
            fetched += 1;
        }
        session
            .uid_store(&set, "+FLAGS.SILENT (\\Seen)")
            .map_err(fail)?;
    }
    let _ = session.logout();
    Ok(fetched)
}
