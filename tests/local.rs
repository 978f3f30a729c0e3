//! The router and local delivery: aliases, lists, owner- lists, files, programs, mbox
//! locking, pipe exit codes, and a router killed while it dispatches.

mod common;
use common::*;
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

fn header<'a>(msg: &'a str, name: &str) -> Vec<&'a str> {
    let head = msg.split("\n\n").next().unwrap_or("");
    head.lines()
        .filter_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .map(str::trim)
        .collect()
}

#[test]
fn aliases_lists_includes_loops_owners_pipes_files() {
    let mut inst = Instance::new("", "");
    let dir = inst.dir.clone();
    let members: String = (0..1000).map(|i| format!("alice+m{i}\n")).collect();
    std::fs::write(dir.join("big.list"), members).unwrap();
    let aliases = format!(
        "postmaster: alice\n\
         team: alice, sub\n\
         sub: bob, alice\n\
         big: :include:{dir}/big.list\n\
         owner-big: bob\n\
         loop1: loop2\n\
         loop2: loop1\n\
         filer: {dir}/file.mbox\n\
         piper: \"|cat > {dir}/piped.$$\"\n",
        dir = dir.display()
    );
    std::fs::write(dir.join("aliases"), aliases).unwrap();
    inst.own();
    // A list is the sysadmin's or its owner's, never the mail system's user's: that one is
    // refused (a link into the spool would be read as a list).
    if is_root() {
        std::os::unix::fs::chown(dir.join("big.list"), Some(0), Some(0)).unwrap();
    }
    inst.start();
    let out = inst.qms(&["newaliases"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("9 aliases"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Nested list with a duplicate: alice once, bob once.
    smtp_send(
        inst.smtp_port,
        "sender@example.test",
        &["team@example.test"],
        "Subject: team\r\n\r\nto the team\r\n",
        "",
    );
    wait_for("team copies", Duration::from_secs(30), || {
        inst.count_new("alice") == 1 && inst.count_new("bob") == 1
    });

    // A 1,000-member :include: list with an owner: every member once, sender = owner-big.
    smtp_send(
        inst.smtp_port,
        "sender@example.test",
        &["big@example.test"],
        "Subject: big\r\n\r\nto the list\r\n",
        "",
    );
    wait_for("1,000 list copies", Duration::from_secs(120), || {
        inst.count_new("alice") == 1001
    });
    let alice = inst.read_maildir("alice");
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in alice.iter().filter(|m| m.contains("Subject: big")) {
        assert_eq!(
            header(m, "Return-Path"),
            vec!["<owner-big@example.test>"],
            "{m}"
        );
        *seen
            .entry(header(m, "Delivered-To")[0].to_string())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 1000);
    assert!(
        seen.values().all(|n| *n == 1),
        "a member got the list twice"
    );

    // A loop fails, and the failure comes back to the sender as a report.
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &["loop1@example.test"],
        "Subject: loop\r\n\r\nround and round\r\n",
        "",
    );
    wait_for("the bounce", Duration::from_secs(30), || {
        inst.read_maildir("alice")
            .iter()
            .any(|m| m.contains("Undelivered Mail"))
    });
    let bounce = inst
        .read_maildir("alice")
        .into_iter()
        .find(|m| m.contains("Undelivered Mail"))
        .unwrap();
    assert!(
        bounce.contains("multipart/report") && bounce.contains("Action: failed"),
        "{bounce}"
    );

    // File and program targets.
    smtp_send(
        inst.smtp_port,
        "sender@example.test",
        &["filer@example.test", "piper@example.test"],
        "Subject: targets\r\n\r\nfile and pipe\r\n",
        "",
    );
    wait_for("the file delivery", Duration::from_secs(30), || {
        std::fs::read_to_string(dir.join("file.mbox")).is_ok_and(|t| t.contains("file and pipe"))
    });
    wait_for("the pipe delivery", Duration::from_secs(30), || {
        std::fs::read_dir(&dir).unwrap().flatten().any(|e| {
            e.file_name().to_string_lossy().starts_with("piped.")
                && std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("file and pipe"))
        })
    });
    let mbox = std::fs::read_to_string(dir.join("file.mbox")).unwrap();
    assert!(mbox.starts_with("From sender@example.test "), "{mbox}");
    wait_for("queues empty", Duration::from_secs(30), || {
        inst.queue_json().is_empty()
    });
}

#[test]
fn mbox_waits_for_a_lock_and_never_interleaves() {
    let mut inst = Instance::new("", "[queues.local]\nworkers = 2\n");
    let dir = inst.dir.clone();
    let mbox = dir.join("carol.mbox");
    inst.edit_config(
        "[mailboxes]\n",
        &format!(
            "[mailboxes]\n\"carol@example.test\" = {{ mbox = \"{}\" }}\n",
            mbox.display()
        ),
    );
    std::fs::write(&mbox, "").unwrap();
    inst.own();
    inst.start();
    // Another program holds the mbox with flock(1); it writes a line and lets go when told.
    let fifo = dir.join("go");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let mut holder = Command::new("flock")
        .arg(&mbox)
        .arg("-c")
        .arg(format!(
            "touch {d}/held; cat {f} > /dev/null; echo HOLDER-WAS-HERE >> {m}",
            d = dir.display(),
            f = fifo.display(),
            m = mbox.display()
        ))
        .spawn()
        .unwrap();
    wait_for("the lock holder", Duration::from_secs(10), || {
        dir.join("held").exists()
    });
    assert!(inst
        .sendmail(
            &["carol@example.test"],
            &message("locked", "waited for the lock")
        )
        .status
        .success());
    wait_for(
        "the delivery to reach the local queue",
        Duration::from_secs(30),
        || inst.log().contains("route=\"mbox:") || inst.log().contains("route=mbox:"),
    );
    std::fs::write(&fifo, "go\n").unwrap();
    holder.wait().unwrap();
    wait_for("the delivery", Duration::from_secs(30), || {
        std::fs::read_to_string(&mbox)
            .unwrap()
            .contains("waited for the lock")
    });
    let text = std::fs::read_to_string(&mbox).unwrap();
    assert!(
        text.find("HOLDER-WAS-HERE").unwrap() < text.find("waited for the lock").unwrap(),
        "qms wrote while the lock was held: {text}"
    );

    // Many deliveries by two workers at once: every message whole, none interleaved.
    send_many(&inst, 100, 4, |i| {
        let body = format!("{}\nEND-{i}-x", format!("line {i}-x\n").repeat(200));
        (
            "carol@example.test".into(),
            message(&format!("c{i}-x"), &body),
        )
    });
    wait_for("100 more messages", Duration::from_secs(60), || {
        std::fs::read_to_string(&mbox)
            .unwrap()
            .matches("\nEND-")
            .count()
            == 100
    });
    let script = "import mailbox,sys\nmb=mailbox.mbox(sys.argv[1])\nbad=0\nn=0\nfor m in mb:\n  p=m.get_payload()\n  s=m['Subject'] or ''\n  if s.startswith('c'):\n    n+=1\n    k=s[1:]\n    if p.count('line '+k+'\\n')!=200 or ('END-'+k) not in p or p.count('line ')!=200: bad+=1\nprint(n,bad)";
    let (ok, out) = python(script, &[mbox.display().to_string()]);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "100 0");
}

#[test]
fn pipe_exit_codes_and_a_hanging_program() {
    let mut inst = Instance::new(
        "",
        "[routes]\n\"ok.test\" = \"pipe:cat > /dev/null; exit 0\"\n\"later.test\" = \"pipe:exit 75\"\n\"fail.test\" = \"pipe:echo 'no such list here' >&2; exit 1\"\n\"hang.test\" = \"pipe:exec sleep 600\"\n[limits]\npipe_timeout = 1\n[outgoing]\nmin_backoff = 3600\nmax_backoff = 3600\n",
    );
    inst.start();
    for to in ["a@ok.test", "b@later.test", "c@fail.test", "d@hang.test"] {
        let out = inst.sendmail(&["-f", "alice@example.test", to], &message(to, "pipe me"));
        assert!(out.status.success());
    }
    wait_for("the ok delivery", Duration::from_secs(30), || {
        inst.log().contains("to=a@ok.test relay=local") && inst.log().contains("status=sent")
    });
    wait_for("the failure report", Duration::from_secs(30), || {
        inst.read_maildir("alice")
            .iter()
            .any(|m| m.contains("c@fail.test"))
    });
    let report = inst
        .read_maildir("alice")
        .into_iter()
        .find(|m| m.contains("c@fail.test"))
        .unwrap();
    assert!(
        report.contains("no such list here") && report.contains("Status: 5.3.0"),
        "{report}"
    );
    wait_for("the two deferrals", Duration::from_secs(30), || {
        let q = inst.queue_json();
        q.len() == 2 && q.iter().all(|j| j["recipients"][0]["state"] == "deferred")
    });
    let q = inst.queue_json();
    let reply = |who: &str| {
        q.iter()
            .find(|j| j["recipients"][0]["address"] == who)
            .unwrap()["recipients"][0]["reply"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(
        reply("b@later.test").contains("exit 75"),
        "{}",
        reply("b@later.test")
    );
    assert!(
        reply("d@hang.test").contains("timed out") && reply("d@hang.test").contains("killed"),
        "{}",
        reply("d@hang.test")
    );
    let sleeping = Command::new("pgrep")
        .args(["-f", "sleep 600"])
        .output()
        .unwrap();
    assert!(
        sleeping.stdout.is_empty(),
        "the hanging program was not killed"
    );
}

#[test]
fn killing_the_router_mid_dispatch_loses_nothing() {
    let mut inst = Instance::new("", "");
    inst.start();
    let n = 300;
    let sent = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..n {
                assert!(inst
                    .sendmail(
                        &["alice@example.test"],
                        &message(&format!("r{i}"), &format!("tok-{i}-"))
                    )
                    .status
                    .success());
            }
            sent.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        // Kill whichever router runs, again and again, while the messages flow.
        let mut kills = 0;
        while !sent.load(std::sync::atomic::Ordering::SeqCst) {
            kills += kill_role(&inst, "router");
            std::thread::sleep(Duration::from_millis(40));
        }
        eprintln!("router killed {kills} times");
    });
    wait_for("every message delivered", Duration::from_secs(120), || {
        let msgs = inst.read_maildir("alice");
        (0..n).all(|i| msgs.iter().any(|m| m.contains(&format!("tok-{i}-"))))
    });
    wait_for("queues empty", Duration::from_secs(60), || {
        inst.queue_json().is_empty()
    });
    let total = inst.count_new("alice");
    eprintln!("{total} deliveries for {n} messages");
    assert!(inst.log().contains("event=died process=router"));
}

/// Issue #14.6: aliases that lead back to themselves fail as a forwarding loop (5.4.6), not as
/// an unknown user; a name defined twice is warned about by newaliases and check-config,
/// and the first definition is used, as postalias does.
#[test]
fn alias_loops_and_duplicate_names() {
    let mut inst = Instance::new("", "");
    std::fs::write(
        inst.dir.join("aliases"),
        "postmaster: alice\nping: pong\npong: ping\ndup: alice\ndup: bob\n",
    )
    .unwrap();
    inst.own();
    let out = inst.qms(&["newaliases"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success() && err.contains("alias \"dup\" is defined again (first at line 4)"),
        "{err}"
    );
    let out = inst.qms(&["check-config"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("warning: aliases:"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    inst.start();
    smtp_send(
        inst.smtp_port,
        "bob@example.test",
        &["ping@example.test", "dup@example.test"],
        "Subject: round\r\n\r\nand round\r\n",
        "",
    );
    wait_for(
        "the loop's error mail to bob",
        Duration::from_secs(30),
        || {
            inst.read_maildir("bob")
                .iter()
                .any(|m| m.contains("Undelivered Mail"))
        },
    );
    let bounce = inst
        .read_maildir("bob")
        .into_iter()
        .find(|m| m.contains("Undelivered Mail"))
        .unwrap();
    assert!(
        bounce.contains("Status: 5.4.6") && bounce.contains("mail forwarding loop"),
        "{bounce}"
    );
    wait_for("dup's copy at alice", Duration::from_secs(30), || {
        inst.count_new("alice") == 1
    });
    assert_eq!(
        inst.read_maildir("bob")
            .iter()
            .filter(|m| m.contains("and round"))
            .count(),
        1,
        "bob has only the bounce: the second `dup` line is not used"
    );
}
