//! Privilege separation, as a security review found it wanting (issue #10): each finding
//! reproduced the way it was found, by ordinary users the test creates, on an instance run
//! by a qms user of its own. Root only: making users and mount namespaces needs it. (Local
//! submission by ordinary users is in local_submit.rs.)

mod common;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

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
