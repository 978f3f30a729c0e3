//! What a local user controls on a shared host (their mailbox, an `:include:` file they own,
//! the files those point to) can defer their own mail, never stall the agents that deliver
//! everyone's, nor make qms run anything as its own user. Ordinary users the tests create;
//! root only.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

/// A local user held the lock of their own mbox with flock(1), or made it a FIFO: the
/// delivery child, which has become that user, waited for ever, and the local agent with it,
/// so nobody's mail was delivered. Now a lock is waited for 20 s at most and a mailbox that
/// is not a regular file is refused: the user's mail is deferred, everyone else's delivered.
#[test]
fn a_user_cannot_stall_local_delivery_with_their_own_mailbox() {
    if !is_root() {
        eprintln!("needs root: creates users");
        return;
    }
    let (bob, eve) = (SystemUser::ordinary("mb"), SystemUser::ordinary("mf"));
    let (mut inst, _qmsuser) = installed("", "[queues.local]\nworkers = 1\n");
    let (bob_box, eve_box) = (bob.home.join("mbox"), eve.home.join("mbox"));
    inst.edit_config(
        "[mailboxes]\n",
        &format!(
            "[mailboxes]\n\"dan@example.test\" = {{ mbox = \"{}\", user = \"{}\" }}\n\
             \"eve@example.test\" = {{ mbox = \"{}\", user = \"{}\" }}\n",
            bob_box.display(),
            bob.name,
            eve_box.display(),
            eve.name
        ),
    );
    // Bob holds his mbox's lock; Eve's mbox is a FIFO nobody reads.
    let held = bob.home.join("held");
    let mut holder = as_user(&mut Command::new("flock"), &bob)
        .arg(&bob_box)
        .arg("-c")
        .arg(format!("touch {}; exec sleep 600", held.display()))
        .spawn()
        .unwrap();
    wait_for("dan's lock", Duration::from_secs(10), || held.exists());
    let fifo = as_user(&mut Command::new("mkfifo"), &eve)
        .arg(&eve_box)
        .status()
        .unwrap();
    assert!(fifo.success());
    inst.start();
    for to in ["dan@example.test", "eve@example.test", "alice@example.test"] {
        let body = format!("Subject: to {to}\r\n\r\nhello\r\n");
        smtp_send(inst.smtp_port, "carol@remote.test", &[to], &body, "");
    }
    wait_for("alice's mail", Duration::from_secs(90), || {
        inst.read_maildir("alice")
            .iter()
            .any(|m| m.contains("to alice@example.test"))
    });
    wait_for(
        "dan's and eve's mail deferred",
        Duration::from_secs(60),
        || {
            queued_reply(&inst, "dan@example.test").is_some()
                && queued_reply(&inst, "eve@example.test").is_some()
        },
    );
    let (b, e) = (
        queued_reply(&inst, "dan@example.test").unwrap_or_default(),
        queued_reply(&inst, "eve@example.test").unwrap_or_default(),
    );
    assert!(b.contains("locked"), "{b}");
    assert!(e.contains("not a regular file"), "{e}");
    let _ = holder.kill();
    let _ = holder.wait();
}

/// An `:include:` file its owner turned into a FIFO: the router opened it to expand the list
/// and waited for a writer for ever, and no mail that needed an alias was routed again. Now
/// an include file must be a regular file: the list's mail is deferred, the rest routed.
#[test]
fn an_include_file_made_a_fifo_defers_its_list_and_nothing_else() {
    if !is_root() {
        eprintln!("needs root: creates users");
        return;
    }
    let owner = SystemUser::ordinary("if");
    let (mut inst, qmsuser) = installed("", "");
    let list = owner.home.join("list.inc");
    let made = as_user(&mut Command::new("mkfifo"), &owner)
        .arg(&list)
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::set_permissions(&owner.home, std::fs::Permissions::from_mode(0o755)).unwrap();
    write_aliases(
        &inst,
        &format!("list: :include:{}\nhelp: alice\n", list.display()),
    );
    inst.use_qms_user(&qmsuser);
    inst.start();
    for to in ["list@example.test", "help@example.test"] {
        let body = format!("Subject: to {to}\r\n\r\nhello\r\n");
        smtp_send(inst.smtp_port, "carol@remote.test", &[to], &body, "");
    }
    wait_for("help@'s mail at alice", Duration::from_secs(60), || {
        inst.read_maildir("alice")
            .iter()
            .any(|m| m.contains("to help@example.test"))
    });
    wait_for("the list's mail deferred", Duration::from_secs(30), || {
        queued_reply(&inst, "list@example.test").is_some_and(|r| !r.is_empty())
    });
    let why = queued_reply(&inst, "list@example.test").unwrap_or_default();
    assert!(why.contains("not a regular file"), "{why}");
}

/// An `:include:` file is a link, made by its owner, to a file of the spool, which belongs to
/// the qms user and holds a message the owner sent: its lines were read as the list, and
/// its command ran as the file's owner, the qms user, with the whole queue open to it. Now
/// an include file the qms user owns is refused, by the router and by local delivery, which
/// expands the list again.
#[test]
fn an_include_file_linked_into_the_spool_runs_nothing_as_qms() {
    if !is_root() {
        eprintln!("needs root: creates users");
        return;
    }
    let owner = SystemUser::ordinary("il");
    let (mut inst, qmsuser) = installed(
        "",
        "[local]\nallow_mail_to_commands = \"alias, include\"\n\
         [routes]\n\"dead.test\" = \"smtp:[127.0.0.1]:1\"\n\
         [outgoing]\nmin_backoff = 3600\nmax_backoff = 3600\n",
    );
    inst.edit_config(
        "local = [\"example.test\"]",
        "local = [\"example.test\"]\nrelay = [\"dead.test\"]",
    );
    let out = drop_box(&inst);
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let list = owner.home.join("list.inc");
    std::fs::set_permissions(&owner.home, std::fs::Permissions::from_mode(0o755)).unwrap();
    write_aliases(&inst, &format!("list: :include:{}\n", list.display()));
    inst.use_qms_user(&qmsuser);
    inst.start();
    // The owner's message, with the line to run, waits in the queue for a dead host.
    let planted = out.join("ran-as");
    let body = format!("Subject: x\r\n\r\n\"|id -u > {}\"\r\n", planted.display());
    smtp_send(
        inst.smtp_port,
        "il@example.test",
        &["x@dead.test"],
        &body,
        "",
    );
    wait_for("the message deferred", Duration::from_secs(30), || {
        queued_reply(&inst, "x@dead.test").is_some_and(|r| !r.is_empty())
    });
    let id = inst.queue_json()[0]["id"].as_str().unwrap().to_string();
    let job = find_file(&inst.spool(), &format!("{id}.json")).expect("the job's file");
    let linked = as_user(&mut Command::new("ln"), &owner)
        .arg("-s")
        .arg(&job)
        .arg(&list)
        .status()
        .unwrap();
    assert!(linked.success());
    smtp_send(
        inst.smtp_port,
        "carol@remote.test",
        &["list@example.test"],
        "Subject: to the list\r\n\r\nhello\r\n",
        "",
    );
    wait_for("the list's mail deferred", Duration::from_secs(60), || {
        queued_reply(&inst, "list@example.test").is_some_and(|r| !r.is_empty())
            || std::fs::read_to_string(&planted).is_ok_and(|t| !t.trim().is_empty())
    });
    assert!(
        !planted.exists(),
        "a command from the spool ran as uid {} (qms is {})",
        std::fs::read_to_string(&planted).unwrap_or_default().trim(),
        qmsuser.uid
    );
    let why = queued_reply(&inst, "list@example.test").unwrap_or_default();
    assert!(why.contains("mail system's user"), "{why}");
}

/// `default_privs` set to the qms user runs the aliases' commands and files as the owner of
/// the queue, which Postfix refuses; `check-config` said nothing of it. Now it warns.
#[test]
fn check_config_warns_when_default_privs_is_the_qms_user() {
    if !is_root() {
        eprintln!("needs root: creates users");
        return;
    }
    let (inst, qmsuser) = installed("", "");
    let says = || text(&inst.qms(&["check-config"]));
    assert!(!says().contains("default_privs"), "{}", says());
    inst.edit_config(
        "[domains]",
        &format!("[local]\ndefault_privs = \"{}\"\n[domains]", qmsuser.name),
    );
    assert!(
        says().contains("is the mail system's user"),
        "no warning: {}",
        says()
    );
}

/// The first file named `name` under `dir`.
fn find_file(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if e.file_name() == name {
            return Some(p);
        }
    }
    None
}
