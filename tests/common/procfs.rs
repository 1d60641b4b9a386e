//! What the tests read of other processes in /proc.

use nix::unistd::Pid;

/// The fields of /proc/<pid>/stat after the command name ("pid (comm) state ppid ...": comm may
/// hold spaces and parentheses, so the fields are counted from its last ')').
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, fields) = stat.rsplit_once(')')?;
    Some(fields.split_whitespace().map(str::to_owned).collect())
}

/// The parent of `pid`.
pub fn parent_of(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// Whether `pid` is still a live (not zombie) process.
pub fn is_running(pid: i32) -> bool {
    stat_fields(pid).is_some_and(|f| !matches!(f.first().map(String::as_str), Some("Z" | "X")))
}

/// Children of `parent` that are zombies.
pub fn zombie_children(parent: i32) -> usize {
    all_pids()
        .filter_map(stat_fields)
        .filter(|f| {
            f.first().map(String::as_str) == Some("Z") && f.get(1) == Some(&parent.to_string())
        })
        .count()
}

/// Direct children of `parent`.
pub fn children_of(parent: Pid) -> Vec<Pid> {
    all_pids()
        .filter(|pid| parent_of(*pid) == Some(parent.as_raw()))
        .map(Pid::from_raw)
        .collect()
}

/// The first child of `pid` (e.g. the namespace's PID 1 under `unshare --fork`).
pub fn first_child(pid: i32) -> Option<i32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

/// A process's resident memory (VmRSS) in kB; None once it is gone.
pub fn resident_kb(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Every pid in /proc.
pub fn all_pids() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
}
