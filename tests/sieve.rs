//! Sieve at local delivery (issue #17): users' scripts run as those users, file into
//! Maildir++ folders read back with Python's mailbox module, discard, redirect (a loop
//! refused), reject (a DSN back), vacation (one reply per sender; none to a list or to
//! `<>`); a script that does not compile or runs too long leaves the mail kept; the success
//! DSN follows the filter. Root only: the scripts' owners are ordinary users made here.

mod common;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// An ordinary user with ~/Maildir and `script` as ~/.qms.sieve, all theirs.
fn user_with_script(tag: &str, script: &str) -> SystemUser {
    let u = SystemUser::ordinary(tag);
    for sub in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(u.home.join("Maildir").join(sub)).unwrap();
    }
    std::fs::write(u.home.join(".qms.sieve"), script).unwrap();
    let st = Command::new("chown")
        .arg("-R")
        .arg(format!("{}:{}", u.uid, u.gid))
        .arg(&u.home)
        .status()
        .unwrap();
    assert!(st.success());
    u
}

fn addr(u: &SystemUser) -> String {
    format!("{}@example.test", u.name)
}

/// The messages of a Maildir++ folder (None: the inbox), with their Maildir flags, read by
/// Python's mailbox module.
fn folder(maildir: &Path, name: Option<&str>) -> Vec<(String, String)> {
    let script = r#"
import mailbox, sys, json
mb = mailbox.Maildir(sys.argv[1], factory=None, create=False)
if sys.argv[2]:
    mb = mb.get_folder(sys.argv[2])
print(json.dumps([[m.get_flags(), m.as_string()] for k, m in sorted(mb.items())]))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(maildir)
        .arg(name.unwrap_or(""))
        .output()
        .unwrap();
    if !out.status.success() {
        return Vec::new();
    }
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn inbox(u: &SystemUser) -> Vec<(String, String)> {
    folder(&u.home.join("Maildir"), None)
}

fn settled(inst: &Instance) -> bool {
    inst.queue_json().is_empty()
}

fn start(top: &str, extra: &str) -> Instance {
    assert!(
        is_root(),
        "these tests make users: run them as root (CI does)"
    );
    let mut inst = Instance::new(&format!("recipient_delimiter = \"+\"\n{top}"), extra);
    inst.start();
    inst
}

#[test]
fn a_users_filter_files_flags_and_discards_as_that_user() {
    let u = user_with_script(
        "f",
        r#"require ["fileinto", "envelope", "subaddress", "body", "imap4flags", "variables", "mailbox", "include"];
if envelope :detail "to" "lists" { fileinto :create "Lists/sales"; stop; }
if header :contains "subject" "junk" { discard; stop; }
if body :contains "urgent" { addflag "\\Flagged"; }
include :personal "rules";
"#,
    );
    // An included script, beside the user's own (`include`, `date`, `relational`).
    let rules = u.home.join("rules.sieve");
    std::fs::write(
        &rules,
        "require [\"fileinto\", \"variables\", \"date\", \"relational\"];\n\
         if allof (header :matches \"subject\" \"report *\", currentdate :value \"ge\" \"year\" \"2000\") {\n\
           set \"n\" \"${1}\"; fileinto \"Reports\";\n}\n",
    )
    .unwrap();
    std::os::unix::fs::chown(&rules, Some(u.uid), Some(u.gid)).unwrap();
    let mut inst = Instance::new(
        "recipient_delimiter = \"+\"\n",
        "[sieve]\nbefore = \"before.sieve\"\n",
    );
    std::fs::write(
        inst.dir.join("before.sieve"),
        "require \"fileinto\";\nif header :is \"X-Spam\" \"yes\" { fileinto \"Junk\"; stop; }\n",
    )
    .unwrap();
    inst.start();
    let me = addr(&u);
    let lists = format!("{}+lists@example.test", u.name);
    for (to, subject, body) in [
        (lists.as_str(), "sales news", "plain"),
        (me.as_str(), "junk offer", "plain"),
        (me.as_str(), "hello", "this is urgent"),
        (me.as_str(), "report 7", "numbers"),
    ] {
        let msg = format!("To: {to}\r\nSubject: {subject}\r\n\r\n{body}\r\n");
        smtp_send(inst.smtp_port, "alice@example.test", &[to], &msg, "");
    }
    let msg = format!("To: {me}\r\nSubject: spam?\r\nX-Spam: yes\r\n\r\nbuy\r\n");
    smtp_send(inst.smtp_port, "alice@example.test", &[&me], &msg, "");
    wait_for("five deliveries", Duration::from_secs(60), || {
        settled(&inst) && inst.log().matches("by the Sieve filter").count() >= 5
    });
    let maildir = u.home.join("Maildir");
    let inbox = folder(&maildir, None);
    assert_eq!(inbox.len(), 1, "{inbox:?}\n{}", inst.log());
    assert!(inbox[0].1.contains("this is urgent"));
    assert!(inbox[0].0.contains('F'), "not flagged: {:?}", inbox[0].0);
    let sales = folder(&maildir, Some("Lists.sales"));
    assert_eq!(sales.len(), 1, "{}", inst.log());
    assert!(sales[0].1.contains("sales news"));
    let reports = folder(&maildir, Some("Reports"));
    assert!(reports.len() == 1 && reports[0].1.contains("report 7"));
    let junk = folder(&maildir, Some("Junk"));
    assert!(junk.len() == 1 && junk[0].1.contains("buy"), "{junk:?}");
    let log = inst.log();
    assert!(!log.contains("junk offer"));
    assert!(log.contains("discarded by the Sieve filter"), "{log}");
    // Written by the user's own process: every file and folder is theirs.
    for entry in walk(&maildir) {
        let m = std::fs::metadata(&entry).unwrap();
        assert_eq!(m.uid(), u.uid, "{} is not the user's", entry.display());
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn vacation_answers_each_sender_once_and_never_a_list_or_the_null_sender() {
    assert!(is_root(), "run as root");
    let u = user_with_script("v", "");
    let script = u.home.join("box.sieve");
    std::fs::write(
        &script,
        "require \"vacation\";\nvacation :days 1 :subject \"Away\" \"I am away until Monday.\";\n",
    )
    .unwrap();
    std::os::unix::fs::chown(&script, Some(u.uid), Some(u.gid)).unwrap();
    // A configured mailbox with its script, run as the mailbox's user.
    let dana = "dana@example.test";
    let mut inst = Instance::new("", "");
    inst.edit_config(
        "\"bob@example.test\" = { maildir = \"mail/bob\" }",
        &format!(
            "\"bob@example.test\" = {{ maildir = \"mail/bob\" }}\n\"{dana}\" = {{ maildir = \"{}\", user = \"{}\", sieve = \"{}\" }}",
            u.home.join("Maildir").display(),
            u.name,
            script.display()
        ),
    );
    inst.start();
    let plain =
        format!("From: alice@example.test\r\nTo: {dana}\r\nSubject: lunch?\r\n\r\nlunch\r\n");
    smtp_send(inst.smtp_port, "alice@example.test", &[dana], &plain, "");
    smtp_send(inst.smtp_port, "alice@example.test", &[dana], &plain, "");
    let list = format!("From: bob@example.test\r\nTo: {dana}\r\nList-Id: <team.example.test>\r\nSubject: list\r\n\r\nlist\r\n");
    smtp_send(inst.smtp_port, "bob@example.test", &[dana], &list, "");
    let null =
        format!("From: x@example.test\r\nTo: {dana}\r\nSubject: notice\r\n\r\nnull sender\r\n");
    smtp_send(inst.smtp_port, "", &[dana], &null, "");
    wait_for(
        "four kept and the reply delivered",
        Duration::from_secs(60),
        || inbox(&u).len() == 4 && settled(&inst) && !inst.read_maildir("alice").is_empty(),
    );
    let replies = inst.read_maildir("alice");
    assert_eq!(replies.len(), 1, "{replies:?}\n{}", inst.log());
    let r = &replies[0];
    assert!(r.contains("Return-Path: <>"), "{r}");
    assert!(r.contains("Auto-Submitted: auto-replied"), "{r}");
    assert!(
        r.contains("Subject: Away") && r.contains("I am away until Monday."),
        "{r}"
    );
    assert!(inst.read_maildir("bob").is_empty(), "a list was answered");
    assert_eq!(inst.log().matches("status=vacation-sent").count(), 1);
    // The memory of who was answered is the user's.
    let seen = u.home.join("Maildir/qms-sieve.seen");
    assert_eq!(std::fs::metadata(&seen).unwrap().uid(), u.uid);
}

#[test]
fn redirect_goes_on_a_loop_is_refused_and_the_sender_is_never_the_target() {
    let a = user_with_script("a", "");
    let b = user_with_script("b", "");
    let c = user_with_script("c", "redirect \"alice@example.test\";\n");
    let set = |u: &SystemUser, to: &SystemUser| {
        let p = u.home.join(".qms.sieve");
        std::fs::write(&p, format!("redirect \"{}\";\n", addr(to))).unwrap();
        std::os::unix::fs::chown(&p, Some(u.uid), Some(u.gid)).unwrap();
    };
    set(&a, &b);
    set(&b, &a);
    let inst = start("", "");
    let msg = "Subject: round and round\r\n\r\nloop\r\n";
    smtp_send(inst.smtp_port, "alice@example.test", &[&addr(&a)], msg, "");
    let own = "Subject: to myself\r\n\r\nmine\r\n";
    smtp_send(inst.smtp_port, "alice@example.test", &[&addr(&c)], own, "");
    wait_for("the loop's bounce", Duration::from_secs(60), || {
        settled(&inst)
            && inst
                .read_maildir("alice")
                .iter()
                .any(|m| m.contains("5.4.6"))
    });
    let log = inst.log();
    assert_eq!(log.matches("status=redirected").count(), 2, "{log}");
    assert!(
        inbox(&a).is_empty() && inbox(&b).is_empty(),
        "a redirect kept a copy"
    );
    // A redirect back to the sender is refused, and the mail kept instead.
    let kept = inbox(&c);
    assert!(
        kept.len() == 1 && kept[0].1.contains("mine"),
        "{kept:?}\n{log}"
    );
    assert!(
        log.contains("redirect to the sender alice@example.test refused"),
        "{log}"
    );
    assert_eq!(inst.read_maildir("alice").len(), 1, "{log}");
}

#[test]
fn reject_sends_the_refusal_back_as_a_dsn() {
    let u = user_with_script(
        "r",
        "require \"reject\";\nreject \"I do not take mail from you.\";\n",
    );
    let inst = start("", "");
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &[&addr(&u)],
        "Subject: hi\r\n\r\nhello\r\n",
        "",
    );
    wait_for("the refusal", Duration::from_secs(60), || {
        settled(&inst) && !inst.read_maildir("alice").is_empty()
    });
    let dsn = &inst.read_maildir("alice")[0];
    assert!(dsn.contains("I do not take mail from you."), "{dsn}");
    assert!(
        dsn.contains("Status: 5.7.1") && dsn.contains("Action: failed"),
        "{dsn}"
    );
    assert!(inbox(&u).is_empty());
}

#[test]
fn a_broken_unsafe_or_endless_script_keeps_the_mail_and_says_why() {
    let broken = user_with_script(
        "x",
        "require \"fileinto\";\nif header :contains \"subject\" \"x\" {\n  fileinto \"A\"\n}\n",
    );
    let mut many = String::from("require \"fileinto\";\n");
    for i in 0..400 {
        many.push_str(&format!(
            "if header :contains \"subject\" \"no{i}\" {{ fileinto \"F{i}\"; }}\n"
        ));
    }
    many.push_str("discard;\n");
    let endless = user_with_script("e", &many);
    let unsafe_ = user_with_script("w", "discard;\n");
    std::fs::set_permissions(
        unsafe_.home.join(".qms.sieve"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let inst = start("", "[sieve]\nmax_instructions = 500\n");
    for u in [&broken, &endless, &unsafe_] {
        smtp_send(
            inst.smtp_port,
            "alice@example.test",
            &[&addr(u)],
            "Subject: x marks\r\n\r\nkeep me\r\n",
            "",
        );
    }
    wait_for("three kept", Duration::from_secs(60), || {
        [&broken, &endless, &unsafe_]
            .iter()
            .all(|u| inbox(u).len() == 1)
            && settled(&inst)
    });
    let log = inst.log();
    let warning = |u: &SystemUser| {
        log.lines()
            .find(|l| l.contains(&format!("to={}", addr(u))) && l.contains("status=warning"))
            .unwrap_or_else(|| panic!("no warning for {}: {log}", u.name))
            .to_string()
    };
    assert!(warning(&broken).contains("line 4"), "{log}");
    assert!(warning(&endless).contains("max_instructions"), "{log}");
    assert!(
        warning(&unsafe_).contains("only its owner may write"),
        "{log}"
    );
}

#[test]
fn the_success_report_follows_the_filter() {
    let kept = user_with_script("k", "require \"fileinto\";\nfileinto \"Saved\";\n");
    let gone = user_with_script("d", "discard;\n");
    let sent = user_with_script("s", "redirect \"alice@example.test\";\n");
    let inst = start("", "");
    smtp_send(
        inst.smtp_port,
        "bob@example.test",
        &[&addr(&kept), &addr(&gone), &addr(&sent)],
        "Subject: tell me\r\n\r\nreport\r\n",
        "NOTIFY=SUCCESS",
    );
    wait_for(
        "reports and the redirected copy",
        Duration::from_secs(60),
        || {
            settled(&inst)
                && inst.read_maildir("bob").len() >= 2
                && !inst.read_maildir("alice").is_empty()
        },
    );
    let reports = inst.read_maildir("bob").join("\n----\n");
    let status = |u: &SystemUser| {
        let at = reports
            .find(&format!("Final-Recipient: rfc822; {}", addr(u)))
            .map(|i| &reports[i..])
            .unwrap_or("");
        at.lines()
            .find_map(|l| l.strip_prefix("Action: "))
            .unwrap_or("none")
            .to_string()
    };
    assert_eq!(status(&kept), "delivered", "{reports}");
    assert_eq!(status(&sent), "relayed", "{reports}");
    assert!(
        !reports.contains(&addr(&gone)),
        "a discard was reported: {reports}"
    );
}

#[test]
fn sieve_check_and_test_say_what_a_script_does() {
    let dir = std::env::temp_dir().join(format!("qms-sieve-tool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.sieve");
    std::fs::write(
        &good,
        "require [\"fileinto\", \"vacation\"];\nif header :contains \"subject\" \"sales\" { fileinto \"Sales\"; }\nvacation :subject \"Out\" \"Back soon\";\n",
    )
    .unwrap();
    let bad = dir.join("bad.sieve");
    std::fs::write(&bad, "require \"fileinto\";\nfileinto \"A\"\nkeep;\n").unwrap();
    let msg = dir.join("m.eml");
    std::fs::write(
        &msg,
        "From: x@example.org\nTo: me@example.org\nSubject: sales\n\nhi\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(test_bin())
            .arg("-c")
            .arg(dir.join("none.toml"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["sieve", "check", good.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let out = run(&["sieve", "check", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 3"),
        "{out:?}"
    );
    let out = run(&[
        "sieve",
        "test",
        good.to_str().unwrap(),
        msg.to_str().unwrap(),
        "--from",
        "x@example.org",
        "--to",
        "me@example.org",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            "fileinto \"Sales\"",
            "vacation reply to \"x@example.org\", subject \"Out\""
        ],
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two messages from one sender that reach the mailbox in the same delivery batch (queued
/// before qms starts) get one vacation reply, not one each.
#[test]
fn one_reply_for_a_sender_whose_messages_come_in_one_batch() {
    let u = user_with_script(
        "b",
        "require \"vacation\";\nvacation :days 1 :subject \"Away\" \"Back on Monday.\";\n",
    );
    let mut inst = Instance::new("", "");
    let me = addr(&u);
    for subject in ["first", "second", "third"] {
        let msg = format!("From: alice@example.test\nTo: {me}\nSubject: {subject}\n\nhello\n");
        let out = inst.sendmail(&["-f", "alice@example.test", &me], msg.as_bytes());
        assert!(out.status.success(), "{out:?}");
    }
    inst.start();
    wait_for(
        "three kept and the replies delivered",
        Duration::from_secs(60),
        || inbox(&u).len() == 3 && settled(&inst) && !inst.read_maildir("alice").is_empty(),
    );
    let replies = inst.read_maildir("alice");
    assert_eq!(replies.len(), 1, "{replies:?}\n{}", inst.log());
}
