//! An instance installed as the documentation says (its own binaries and qms user,
//! `set-permissions` run), and what the privilege tests do to it as ordinary users.

use super::*;
use std::process::Output;

/// What a command printed, standard output then error.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// An instance with its own binaries and its own qms user, permissions set as documented.
pub fn installed(top: &str, extra: &str) -> (Instance, SystemUser) {
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
pub fn as_user_with_system_config(
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
pub fn write_aliases(inst: &Instance, more: &str) {
    std::fs::write(
        inst.dir.join("aliases"),
        format!("postmaster: alice\n{more}"),
    )
    .unwrap();
}

/// A directory anyone may write into, for what delivery commands leave behind.
pub fn drop_box(inst: &Instance) -> std::path::PathBuf {
    let d = inst.dir.join("out");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777)).unwrap();
    d
}

/// The ids a process's `/proc/PID/status` gives under `field` (`Uid:`, `Gid:`, `Groups:`).
pub fn status_ids(pid: u32, field: &str) -> Vec<u32> {
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
