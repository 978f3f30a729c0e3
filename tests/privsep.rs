//! Privilege separation, as a security review found it wanting (issue #10): each finding
//! reproduced the way it was found, by ordinary users the test creates, on an instance run
//! by a qms user of its own. Root only: making users and mount namespaces needs it.

mod common;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Output};
use std::time::Duration;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// An instance with its own binaries and its own qms user, permissions set as documented.
fn installed(top: &str, extra: &str) -> (Instance, SystemUser) {
    let qmsuser = SystemUser::system("q");
    let mut inst = Instance::new(top, extra);
    inst.install_bins();
    inst.use_qms_user(&qmsuser);
    let out = inst.qms(&["set-permissions"]);
    // Against an older build (QMS_TEST_BIN, to watch a finding fail) there is no such
    // command; the finding itself is what those runs check.
    if std::env::var_os("QMS_TEST_BIN").is_none() {
        assert!(out.status.success(), "set-permissions: {}", text(&out));
    }
    (inst, qmsuser)
}

/// Runs `command` (stdin from `input`) as `user`, with the instance's config as the
/// system's (/etc/qms/qms.toml in a mount namespace of its own), as local users run sendmail.
fn as_user_with_system_config(
    inst: &Instance,
    user: &SystemUser,
    command: &str,
    input: &std::path::Path,
) -> Output {
    let script = format!(
        "exec setpriv --reuid {} --regid {} --clear-groups {command} < {}",
        user.uid,
        user.gid,
        input.display()
    );
    in_system_config(&inst.dir, &script).output().unwrap()
}

/// Replaces the instance's aliases: `postmaster: alice` and `more`.
fn write_aliases(inst: &Instance, more: &str) {
    std::fs::write(
        inst.dir.join("aliases"),
        format!("postmaster: alice\n{more}"),
    )
    .unwrap();
}

/// A directory anyone may write into, for what delivery commands leave behind.
fn drop_box(inst: &Instance) -> std::path::PathBuf {
    let d = inst.dir.join("out");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777)).unwrap();
    d
}

fn status_ids(pid: u32, field: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Finding 1: with qms made set-group-id qms (the old documented install), an ordinary user
/// could read and delete everyone's mail and run roles with group qms.
#[test]
fn a_set_group_id_qms_gives_an_ordinary_user_nothing() {
    if !is_root() {
        eprintln!("needs root: creates users");
        return;
    }
    let (mut inst, qmsuser) = installed("", "[routes]\n\"dead.test\" = \"smtp:[127.0.0.1]:1\"\n");
    inst.edit_config(
        "local = [\"example.test\"]",
        "local = [\"example.test\"]\nrelay = [\"dead.test\"]",
    );
    inst.start();
    smtp_send(
        inst.smtp_port,
        "bob@remote.test",
        &["carol@dead.test"],
        "Subject: private\r\n\r\nsecret-body-text\r\n",
        "",
    );
    wait_for(
        "the message to wait for the dead host",
        Duration::from_secs(30),
        || inst.queue_json().iter().any(|j| j["queue"] == "smtp"),
    );
    let id = inst.queue_json()[0]["id"].as_str().unwrap().to_string();
    // The old install: qms set-group-id qms.
    let st = Command::new("chgrp")
        .arg(&qmsuser.name)
        .arg(&inst.bin)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::set_permissions(&inst.bin, std::fs::Permissions::from_mode(0o2755)).unwrap();

    let user = SystemUser::ordinary("u");
    let run = |args: &[&str]| {
        as_user(
            Command::new(&inst.bin)
                .arg("-c")
                .arg(&inst.config)
                .args(args),
            &user,
        )
        .output()
        .unwrap()
    };
    let show = run(&["queue", "show", &id, "--body"]);
    assert!(
        !show.status.success(),
        "show --body worked: {}",
        text(&show)
    );
    assert!(!text(&show).contains("secret-body-text"), "{}", text(&show));
    assert!(text(&show).contains("permission denied"), "{}", text(&show));
    let del = run(&["queue", "delete", &id]);
    assert!(!del.status.success(), "{}", text(&del));
    assert!(
        inst.queue_json().iter().any(|j| j["id"] == id.as_str()),
        "the message was deleted"
    );
    // mailq through its link lists the queue for the user: envelopes only.
    let links = inst.dir.join("links");
    std::fs::create_dir_all(&links).unwrap();
    std::os::unix::fs::symlink(&inst.bin, links.join("mailq")).unwrap();
    let q = as_user(&mut Command::new(links.join("mailq")), &user)
        .env("QMS_CONFIG", &inst.config)
        .output()
        .unwrap();
    assert!(q.status.success(), "{}", text(&q));
    assert!(
        text(&q).contains(&id) && text(&q).contains("carol@dead.test"),
        "{}",
        text(&q)
    );
    assert!(!text(&q).contains("secret-body-text"));

    // A role started by the user with a config of their own keeps none of group qms.
    let evil = user.home.join("evil.toml");
    let port = free_port();
    std::fs::write(
        &evil,
        format!("spool = \"spool\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n"),
    )
    .unwrap();
    std::os::unix::fs::chown(&evil, Some(user.uid), Some(user.gid)).unwrap();
    let mut role = as_user(
        Command::new(&inst.bin)
            .arg("-c")
            .arg(&evil)
            .arg("smtpd")
            .current_dir(&user.home),
        &user,
    )
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    wait_for("the user's smtpd", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let gids = status_ids(role.id(), "Gid:");
    let _ = role.kill();
    let _ = role.wait();
    assert_eq!(gids.len(), 4, "no Gid line");
    assert!(
        gids.iter().all(|g| *g == user.gid),
        "the user's process kept group qms: Gid {gids:?}, qms is {}",
        qmsuser.gid
    );
}

/// Finding 2, and the `|` alias check: no delivery runs with any uid 0, and a job planted
/// in queue/local with a route of its own runs nothing.
#[test]
fn deliveries_never_run_as_root_and_a_planted_job_runs_nothing() {
    if !is_root() {
        eprintln!("needs root: creates users");
        return;
    }
    let (mut inst, qmsuser) = installed("", "[queues.local]\nworkers = 0\n");
    let out = drop_box(&inst);
    write_aliases(
        &inst,
        &format!(
            "ids: \"|(id -ru; id -u; id -rg; id -g) > {}/ids\"\n",
            out.display()
        ),
    );
    inst.use_qms_user(&qmsuser);
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o1777)).unwrap();
    inst.start();
    // With no local worker, the job waits in queue/local; plant a command into it.
    smtp_send(
        inst.smtp_port,
        "bob@remote.test",
        &["alice@example.test"],
        "Subject: p\r\n\r\nx\r\n",
        "",
    );
    wait_for("the job in queue/local", Duration::from_secs(30), || {
        inst.queue_json().iter().any(|j| j["queue"] == "local")
    });
    let id = inst.queue_json()[0]["id"].as_str().unwrap().to_string();
    inst.stop();
    let job_path = inst.spool().join("queue/local").join(format!("{id}.json"));
    let (mut job, message) = read_job_file(&job_path);
    let planted = out.join("planted");
    job["recipients"][0]["route"] = format!("pipe:id -ru > {}", planted.display()).into();
    job["recipients"][0].as_object_mut().unwrap().remove("user");
    write_job_file(&job_path, &job, message.as_deref());
    std::os::unix::fs::chown(&job_path, Some(qmsuser.uid), Some(qmsuser.gid)).unwrap();
    inst.edit_config(
        "[queues.local]\nworkers = 0\n",
        "[queues.local]\nworkers = 1\n",
    );
    inst.start();
    smtp_send(
        inst.smtp_port,
        "bob@remote.test",
        &["ids@example.test"],
        "Subject: ids\r\n\r\nx\r\n",
        "",
    );
    let ids = out.join("ids");
    wait_for("the ids alias to run", Duration::from_secs(30), || {
        std::fs::read_to_string(&ids).is_ok_and(|t| t.lines().count() == 4)
    });
    let got = std::fs::read_to_string(&ids).unwrap();
    assert!(
        got.lines().all(|l| l.trim() != "0"),
        "a delivery ran with id 0:\n{got}"
    );
    wait_for(
        "the planted job to be refused",
        Duration::from_secs(30),
        || {
            inst.log().contains(&format!("qid={id}"))
                && inst.log().contains("not given by the config")
        },
    );
    assert!(
        !planted.exists(),
        "the planted command ran: {:?}",
        std::fs::read_to_string(&planted)
    );
    // Every process of the instance: no uid 0 anywhere.
    let pids = Command::new("pgrep")
        .args(["-f", &inst.config.display().to_string()])
        .output()
        .unwrap();
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        let uids = status_ids(pid.parse().unwrap(), "Uid:");
        assert!(!uids.contains(&0), "process {pid} has uid 0: {uids:?}");
    }
}

/// Finding 3: commands from an `:include:` file run as the file's owner, not as qms.
#[test]
fn include_file_commands_run_as_the_files_owner() {
    if !is_root() {
        eprintln!("needs root: creates users");
        return;
    }
    let owner = SystemUser::ordinary("i");
    let (mut inst, qmsuser) =
        installed("", "[local]\nallow_mail_to_commands = \"alias, include\"\n");
    let out = drop_box(&inst);
    let list = owner.home.join("list.inc");
    std::fs::write(&list, format!("\"|id -u > {}/inc\"\n", out.display())).unwrap();
    std::os::unix::fs::chown(&list, Some(owner.uid), Some(owner.gid)).unwrap();
    std::fs::set_permissions(&owner.home, std::fs::Permissions::from_mode(0o755)).unwrap();
    write_aliases(&inst, &format!("list: :include:{}\n", list.display()));
    inst.use_qms_user(&qmsuser);
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o1777)).unwrap();
    inst.start();
    smtp_send(
        inst.smtp_port,
        "bob@remote.test",
        &["list@example.test"],
        "Subject: i\r\n\r\nx\r\n",
        "",
    );
    let f = out.join("inc");
    wait_for(
        "the include file's command",
        Duration::from_secs(30),
        || std::fs::read_to_string(&f).is_ok_and(|t| !t.trim().is_empty()),
    );
    assert_eq!(
        std::fs::read_to_string(&f).unwrap().trim(),
        owner.uid.to_string()
    );
}

/// Finding 4: `qms start` as root followed a symlink planted in the spool and gave a root
/// file to the qms user.
#[test]
fn start_as_root_never_follows_a_link_in_the_spool() {
    if !is_root() {
        eprintln!("needs root: chown");
        return;
    }
    // The links are planted by a local user (through the old group-writable spool).
    let planter = SystemUser::ordinary("p");
    let mut inst = Instance::new("", "");
    let victim = inst.dir.join("victim");
    std::fs::write(&victim, "root's\n").unwrap();
    let victim_dir = inst.dir.join("victimdir");
    std::fs::create_dir(&victim_dir).unwrap();
    for d in ["msg", "queue/local", "track"] {
        std::fs::create_dir_all(inst.spool().join(d)).unwrap();
    }
    inst.own();
    for (v, link) in [
        (&victim, "msg/evil"),
        (&victim_dir, "queue/local/evil"),
        (&victim, "track/t"),
    ] {
        std::os::unix::fs::symlink(v, inst.spool().join(link)).unwrap();
        std::os::unix::fs::lchown(inst.spool().join(link), Some(planter.uid), Some(65534)).unwrap();
    }
    std::os::unix::fs::chown(&victim, Some(0), Some(0)).unwrap();
    std::os::unix::fs::chown(&victim_dir, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let _ = inst.qms(&["set-permissions"]);
    inst.start();
    inst.stop();
    for v in [&victim, &victim_dir] {
        let m = std::fs::metadata(v).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0), "{} was given away", v.display());
    }
    assert_eq!(std::fs::metadata(&victim).unwrap().mode() & 0o7777, 0o600);
}

/// Findings 5 and 7, and local submission as documented: an ordinary user sends with
/// `sendmail` through its link; the mail arrives (fs.protected_hardlinks=1), is tracked, its
/// envelope sender is the user's own whatever the tracked-sending fields say, and the spool
/// has the owners and modes of docs/security.md.
#[test]
fn an_ordinary_user_submits_through_postdrop_and_cannot_forge_the_sender() {
    if !is_root() {
        eprintln!("needs root: creates users");
        return;
    }
    let st = Command::new("sysctl")
        .args(["-w", "fs.protected_hardlinks=1"])
        .output()
        .unwrap();
    assert!(st.status.success());
    let (mut inst, qmsuser) = installed("", "");
    inst.start();
    let bin_dir = inst.bin.parent().unwrap().to_path_buf();
    // What set-permissions made.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
    let helper = std::fs::metadata(bin_dir.join("qms-postdrop")).unwrap();
    assert_eq!(
        (helper.uid(), helper.gid(), helper.mode() & 0o7777),
        (0, qmsuser.gid, 0o2755)
    );
    assert_eq!(mode(&inst.bin) & 0o6000, 0, "qms itself is never set-id");
    assert_eq!(mode(&inst.spool()), 0o711);
    assert_eq!(mode(&inst.spool().join("maildrop")), 0o1730);
    for d in ["msg", "queue", "queue/incoming", "hold", "tmp", "track"] {
        assert_eq!(mode(&inst.spool().join(d)), 0o700, "{d}");
        assert_eq!(
            std::fs::metadata(inst.spool().join(d)).unwrap().uid(),
            qmsuser.uid,
            "{d}"
        );
    }

    let user = SystemUser::ordinary("s");
    let links = inst.dir.join("links");
    std::fs::create_dir_all(&links).unwrap();
    std::os::unix::fs::symlink(&inst.bin, links.join("sendmail")).unwrap();
    let msg = inst.dir.join("msg.txt");
    std::fs::write(
        &msg,
        "X-B-Envelope-Addr: ceo@example.test\nBX-Non-Delivery-Notification-Req-To: ceo@example.test\n\
Subject: from a user\n\nhello from an ordinary user\n",
    )
    .unwrap();
    std::fs::set_permissions(&msg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = as_user_with_system_config(
        &inst,
        &user,
        &format!("{} -oi alice", links.join("sendmail").display()),
        &msg,
    );
    assert!(out.status.success(), "sendmail as a user: {}", text(&out));
    wait_for("the user's message", Duration::from_secs(30), || {
        inst.count_new("alice") == 1
    });
    let m = &inst.read_maildir("alice")[0];
    assert!(m.contains("hello from an ordinary user"), "{m}");
    assert!(
        m.starts_with(&format!("Return-Path: <{}@example.test>", user.name)),
        "the envelope sender was not the user's own: {m}"
    );
    assert!(inst.log().contains("status=msp-refused"), "{}", inst.log());
    // Tracked like any other message: the tracking events of pickup reach the database.
    let mid = m
        .lines()
        .find_map(|l| l.strip_prefix("Message-ID: "))
        .expect("a Message-ID")
        .trim()
        .to_string();
    wait_for("the tracking record", Duration::from_secs(30), || {
        text(&inst.qms(&["track", &mid])).contains("received")
    });
    assert!(
        inst.files("maildrop").is_empty(),
        "{:?}",
        inst.files("maildrop")
    );
    // The durability audit of the drop path (issue #12): sendmail exits 0 only after
    // qms-postdrop's file and its directory entry are on disk.
    let trace = inst.dir.join("trace.postdrop");
    let script = format!(
        "exec {} setpriv --reuid {} --regid {} --clear-groups {} -oi alice < {}",
        strace_args(&trace).join(" "),
        user.uid,
        user.gid,
        links.join("sendmail").display(),
        msg.display()
    );
    let out = in_system_config(&inst.dir, &script).output().unwrap();
    assert!(
        out.status.success(),
        "traced sendmail as a user: {}",
        text(&out)
    );
    let checked = audit(&trace, &[inst.spool().join("maildrop").as_path()]);
    assert!(
        checked.contains("sendmail exit 0"),
        "sendmail's exit was not seen"
    );
    wait_for("the second message", Duration::from_secs(30), || {
        inst.count_new("alice") == 2
    });
}

/// Finding 8: sendmail ignored the size limit (and read the whole message into memory).
#[test]
fn sendmail_refuses_a_message_over_the_size_limit() {
    if !is_root() {
        eprintln!("needs root: creates users");
        return;
    }
    let (mut inst, _q) = installed("", "[limits]\nmessage_size = 100000\n");
    inst.start();
    let big = format!(
        "Subject: big\n\n{}",
        format!("{}\n", "x".repeat(76)).repeat(4000)
    );
    let f = inst.dir.join("big.txt");
    std::fs::write(&f, &big).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    // It stops reading at the limit, so the input is a file rather than a pipe.
    let root = Command::new(&inst.bin)
        .arg("-c")
        .arg(&inst.config)
        .args(["sendmail", "alice"])
        .stdin(std::fs::File::open(&f).unwrap())
        .output()
        .unwrap();
    assert_eq!(root.status.code(), Some(65), "root: {}", text(&root));
    let user = SystemUser::ordinary("z");
    let out = as_user_with_system_config(
        &inst,
        &user,
        &format!("{} sendmail alice", inst.bin.display()),
        &f,
    );
    assert_eq!(out.status.code(), Some(65), "user: {}", text(&out));
    assert!(text(&out).contains("too large"), "{}", text(&out));
    // A small one goes through, so nothing else was in the way.
    assert!(inst
        .sendmail(&["alice"], b"Subject: small\n\nsmall\n")
        .status
        .success());
    wait_for("the small message", Duration::from_secs(30), || {
        inst.count_new("alice") == 1
    });
    assert!(inst.queue_json().is_empty() && inst.files("maildrop").is_empty());
    assert!(!inst.read_maildir("alice")[0].contains("Subject: big"));
}

/// Finding 9: a bare CR given to sendmail reached the next hop unchanged.
#[test]
fn a_bare_cr_from_sendmail_never_reaches_the_spool() {
    let mut inst = Instance::new("", "");
    inst.start();
    let out = inst.sendmail(
        &["-oi", "alice"],
        b"Subject: cr\n\nbefore\r.\rafter\nlast line\n",
    );
    assert!(out.status.success(), "{}", text(&out));
    wait_for("the message", Duration::from_secs(30), || {
        inst.count_new("alice") == 1
    });
    let dir = inst.maildir("alice").join("new");
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let raw = std::fs::read(file).unwrap();
    assert!(
        !raw.contains(&b'\r'),
        "a CR reached the mailbox: {:?}",
        String::from_utf8_lossy(&raw)
    );
    let t = String::from_utf8_lossy(&raw);
    assert!(t.contains("before\n.\nafter\nlast line"), "{t}");
}

/// Finding 10: mail to root and system accounts was accepted, then deferred for days.
#[test]
fn mail_to_root_goes_to_the_postmaster_and_system_accounts_are_refused() {
    let mut inst = Instance::new("", "");
    inst.start();
    let script = r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30)
s.ehlo("client.test")
s.mail("bob@remote.test")
for who in ["daemon", "bin", "nobody"]:
    code, text = s.rcpt(who + "@example.test")
    assert code == 550 and b"5.1.1" in text, (who, code, text)
code, text = s.rcpt("root@example.test")
assert code == 250, (code, text)
code, text = s.data(b"Subject: to root\r\n\r\ncron output\r\n")
assert code == 250, (code, text)
s.quit()
"#;
    let (ok, out) = python(script, &[inst.smtp_port.to_string()]);
    assert!(ok, "{out}");
    wait_for(
        "root's mail at the postmaster",
        Duration::from_secs(30),
        || inst.count_new("alice") == 1,
    );
    assert!(inst.read_maildir("alice")[0].contains("cron output"));
}

/// Finding 6: an authenticated user on port 25 could relay with any MAIL FROM; and through
/// submission the tracked-sending fields could set a sender the user does not own.
#[test]
fn auth_on_port_25_and_tracked_fields_keep_to_the_users_own_senders() {
    let mut inst = Instance::new("", "[auth]\nusers = \"users\"\nplaintext_loopback = true\n");
    std::fs::write(inst.dir.join("users"), passwd_line("alice", "pw-of-alice")).unwrap();
    inst.own();
    inst.start();
    let script = r#"
import smtplib, sys
for port in [int(sys.argv[1]), int(sys.argv[2])]:
    s = smtplib.SMTP("127.0.0.1", port, timeout=30)
    s.ehlo("client.test")
    s.login("alice", "pw-of-alice")
    code, text = s.mail("ceo@example.test")
    assert code == 553, (port, code, text)
    s.rset()
    code, text = s.mail("alice@example.test")
    assert code == 250, (port, code, text)
    s.quit()
s = smtplib.SMTP("127.0.0.1", int(sys.argv[2]), timeout=30)
s.ehlo("client.test")
s.login("alice", "pw-of-alice")
s.sendmail("alice@example.test", ["bob@example.test"],
    b"X-B-Envelope-Addr: ceo@example.test\r\nSubject: tracked\r\n\r\nx\r\n")
s.quit()
"#;
    let (ok, out) = python(
        script,
        &[inst.smtp_port.to_string(), inst.submission_port.to_string()],
    );
    assert!(ok, "{out}");
    wait_for("bob's message", Duration::from_secs(30), || {
        inst.count_new("bob") == 1
    });
    let m = &inst.read_maildir("bob")[0];
    assert!(m.starts_with("Return-Path: <alice@example.test>"), "{m}");
}

/// Configuration mistakes defer mail, never lose it; `check-config` names them first; and
/// `qms start` as root without `user` refuses to run.
#[test]
fn configuration_mistakes_defer_and_check_config_names_them() {
    let mut inst = Instance::new(
        "",
        "[routes]\n\"pipe.test\" = \"pipe:/nonexistent/program\"\n",
    );
    inst.edit_config(
        "[mailboxes]\n",
        "[mailboxes]\n\"carol@example.test\" = { maildir = \"mail/carol\", user = \"no-such-user-qms\" }\n",
    );
    let missing = inst.dir.join("missing.list");
    write_aliases(
        &inst,
        &format!(
            "inc: :include:{}\nprog: \"|/nonexistent/program\"\n",
            missing.display()
        ),
    );
    inst.own();
    let check = inst.qms(&["check-config"]);
    assert_eq!(check.status.code(), Some(78), "{}", text(&check));
    for want in ["no-such-user-qms", "/nonexistent/program"] {
        assert!(
            text(&check).contains(want),
            "check-config did not name {want}: {}",
            text(&check)
        );
    }
    inst.start();
    smtp_send(
        inst.smtp_port,
        "bob@remote.test",
        &[
            "carol@example.test",
            "inc@example.test",
            "prog@example.test",
        ],
        "Subject: mistakes\r\n\r\nx\r\n",
        "",
    );
    let deferred = |who: &str| {
        inst.queue_json().iter().any(|j| {
            j["recipients"].as_array().into_iter().flatten().any(|r| {
                r["address"].as_str().is_some_and(|a| a.starts_with(who))
                    && r["state"] == "deferred"
                    && r["reply"].as_str().is_some_and(|t| t.contains("4.3.5"))
            })
        })
    };
    wait_for(
        "three deferrals with 4.3.5",
        Duration::from_secs(30),
        || deferred("carol") && deferred("inc") && deferred("prog"),
    );
    assert!(!inst.log().contains("status=bounced"), "{}", inst.log());
    // Fixed, and tried again: delivered.
    std::fs::write(&missing, "alice\n").unwrap();
    inst.own();
    assert!(inst.qms(&["queue", "retry", "--all"]).status.success());
    wait_for(
        "the include list delivered once fixed",
        Duration::from_secs(30),
        || inst.count_new("alice") == 1,
    );
    if is_root() {
        let bare = Instance::new("", "");
        bare.edit_config("user = \"nobody\"\n", "");
        let out = bare.qms(&["start"]);
        assert!(!out.status.success());
        assert!(text(&out).contains("`user` is not set"), "{}", text(&out));
    }
}

/// A delivery command inherits nothing of qms's: not the listening sockets (it could take
/// port 25's connections) and not the TLS key the supervisor opened as root.
#[test]
fn delivery_commands_inherit_no_listener_and_no_key() {
    let mut inst = Instance::new("", "[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n");
    make_cert(&inst.dir, "mx.example.test");
    let out = drop_box(&inst);
    write_aliases(
        &inst,
        &format!("fds: \"|ls -l /proc/self/fd/ > {}/fds\"\n", out.display()),
    );
    inst.own();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o1777)).unwrap();
    inst.start();
    smtp_send(
        inst.smtp_port,
        "bob@remote.test",
        &["fds@example.test"],
        "Subject: fds\r\n\r\nx\r\n",
        "",
    );
    let f = out.join("fds");
    wait_for(
        "the command's descriptor list",
        Duration::from_secs(30),
        || std::fs::read_to_string(&f).is_ok_and(|t| t.contains("->")),
    );
    let fds = std::fs::read_to_string(&f).unwrap();
    assert!(
        !fds.contains("socket:"),
        "a socket leaked into a delivery command:\n{fds}"
    );
    assert!(
        !fds.contains(".pem"),
        "the TLS files leaked into a delivery command:\n{fds}"
    );
}

/// `set-permissions` (and `qms start` as root) gives a file below the queue that is not the
/// qms user's, or that others may read, back to the qms user with a private mode; it leaves
/// files already in order as they are, and never follows a link out of the spool.
#[test]
fn set_permissions_fixes_queue_files_and_never_follows_a_link() {
    if !is_root() {
        eprintln!("needs root: creates users and changes owners");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let (inst, qmsuser) = installed("", "");
    let q = inst.spool().join("queue/smtp");
    let wrong = q.join("1M0000000000AAAA.json");
    std::fs::write(&wrong, "{}").unwrap();
    std::os::unix::fs::chown(&wrong, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o644)).unwrap();
    let right = q.join("1M0000000000BBBB.json");
    std::fs::write(&right, "{}").unwrap();
    std::os::unix::fs::chown(&right, Some(qmsuser.uid), Some(qmsuser.gid)).unwrap();
    std::fs::set_permissions(&right, std::fs::Permissions::from_mode(0o600)).unwrap();
    let outside = inst.dir.join("outside");
    std::fs::write(&outside, "not the spool's").unwrap();
    std::os::unix::fs::chown(&outside, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink(&outside, q.join("1M0000000000CCCC.json")).unwrap();

    let out = inst.qms(&["set-permissions"]);
    assert!(out.status.success(), "{}", text(&out));
    let m = std::fs::metadata(&wrong).unwrap();
    assert_eq!((m.uid(), m.gid()), (qmsuser.uid, qmsuser.gid));
    assert_eq!(m.mode() & 0o7777, 0o640, "no bit for others");
    let m = std::fs::metadata(&right).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o600, "a file in order is left as it is");
    let m = std::fs::metadata(&outside).unwrap();
    assert_eq!(
        (m.uid(), m.mode() & 0o7777),
        (0, 0o644),
        "the link was not followed"
    );
    assert!(text(&out).contains("a symbolic link"), "{}", text(&out));
}
