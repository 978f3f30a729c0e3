//! Crash safety of the enqueue path: sendmail processes SIGKILLed at random points never
//! leave a half-written job visible, every enqueue that returned is whole, and the next
//! start clears the debris.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

fn rand(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn killed_enqueues_lose_nothing_acknowledged() {
    let mut inst = Instance::new("", "");
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let filler = "x".repeat(100) + "\n";
    let mut returned = Vec::new();
    let mut killed = 0;
    for i in 0..60 {
        let mut body = format!("Subject: crash {i}\n\nTOKEN-{i}-BEGIN\n");
        for _ in 0..1500 {
            body.push_str(&filler);
        }
        body.push_str(&format!("TOKEN-{i}-END\n"));
        let mut child = Command::new(BIN)
            .arg("-c")
            .arg(&inst.config)
            .args(["sendmail", "alice@example.test"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let _ = stdin.write_all(body.as_bytes());
        });
        std::thread::sleep(Duration::from_micros(rand(&mut seed) % 15_000));
        let _ = child.kill();
        let status = child.wait().unwrap();
        let _ = writer.join();
        if status.success() {
            returned.push(i);
        } else {
            killed += 1;
        }
    }
    eprintln!("{} enqueues returned, {killed} killed", returned.len());

    // Every visible job parses and its message is whole; every returned enqueue is visible.
    let mut visible = Vec::new();
    // Jobs are `ID.json`; `.ID.PID.tmp` is a job still being written when its writer died.
    for name in inst.files("queue/incoming") {
        let text = std::fs::read(inst.spool().join("queue/incoming").join(&name)).unwrap();
        let job: serde_json::Value =
            serde_json::from_slice(&text).expect("a visible job is whole JSON");
        let body_name = job["body"].as_str().unwrap();
        let body = std::fs::read_to_string(inst.spool().join("msg").join(body_name))
            .expect("its message file exists");
        let i: usize = body
            .split("TOKEN-")
            .nth(1)
            .unwrap()
            .split('-')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            body.contains(&format!("TOKEN-{i}-END")),
            "message of job {name} is cut short"
        );
        assert_eq!(job["size"].as_u64().unwrap() as usize, body.len());
        visible.push(i);
    }
    for i in &returned {
        assert!(
            visible.contains(i),
            "enqueue {i} returned but its job is missing"
        );
    }

    // The next start cleans the debris and delivers every visible job exactly once.
    inst.start();
    let n = visible.len();
    wait_for(
        "all visible jobs delivered",
        Duration::from_secs(60),
        || inst.count_new("alice") >= n,
    );
    wait_for("queues empty", Duration::from_secs(30), || {
        inst.queue_json().is_empty()
    });
    inst.stop();
    assert_eq!(
        inst.count_new("alice"),
        n,
        "a job was delivered twice or lost"
    );
    assert!(
        inst.files("tmp").is_empty(),
        "tmp/ keeps debris: {:?}",
        inst.files("tmp")
    );
    let staged: Vec<String> = inst
        .all_files("queue/incoming")
        .into_iter()
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(staged.is_empty(), "half-written jobs kept: {staged:?}");
    // Finished message files are kept for reuse (`.free.*`); nothing else may stay.
    let orphans: Vec<String> = inst
        .all_files("msg")
        .into_iter()
        .filter(|n| !n.starts_with(".free."))
        .collect();
    assert!(orphans.is_empty(), "msg/ keeps orphans: {orphans:?}");
    let log = inst.log();
    assert!(log.contains("debris_removed="), "{log}");
}
