//! Local submission on a shared host, as the security review of issue #10 tried it: ordinary
//! users the test creates submit through `sendmail` and `qms-postdrop`, and can neither forge
//! a sender, nor pass a limit, nor put a bare CR or a system account's mail where it does not
//! belong; a mistake in the configuration defers mail and `check-config` names it. Root only.

mod common;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

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
    // The sysadmin's list, as root wrote it: one the qms user owned would be refused.
    if is_root() {
        std::os::unix::fs::chown(&missing, Some(0), Some(0)).unwrap();
    }
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
