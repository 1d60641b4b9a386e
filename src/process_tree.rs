//! The processes under a pid, from /proc: for finding the app's listening ports (its workers
//! may be the ones listening) and for cleaning up what the app left behind.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::Path;
use std::sync::OnceLock;

/// `root` and every descendant, each once.
pub fn descendants_and_self(root: i32) -> Vec<i32> {
    // The children files need CONFIG_PROC_CHILDREN, which some kernels lack; the ppid scan
    // reads every process's stat instead, which costs more but works everywhere.
    static HAS_CHILDREN_FILES: OnceLock<bool> = OnceLock::new();
    let has_children_files =
        *HAS_CHILDREN_FILES.get_or_init(|| Path::new("/proc/thread-self/children").exists());
    let by_parent = if has_children_files {
        HashMap::new()
    } else {
        children_by_ppid()
    };
    let mut tree = vec![root];
    let mut seen = HashSet::from([root]);
    let mut next = 0;
    while let Some(&pid) = tree.get(next) {
        next += 1;
        let children = if has_children_files {
            children_from_files(pid)
        } else {
            by_parent.get(&pid).cloned().unwrap_or_default()
        };
        for child in children {
            // A pid reused while we walk could close a loop.
            if seen.insert(child) {
                tree.push(child);
            }
        }
    }
    tree
}

/// The children of every thread of `pid` (a child belongs to the thread that forked it).
fn children_from_files(pid: i32) -> Vec<i32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// Every process's children, from the ppid field of each /proc/<pid>/stat.
fn children_by_ppid() -> HashMap<i32, Vec<i32>> {
    let mut by_parent: HashMap<i32, Vec<i32>> = HashMap::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return by_parent;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some(ppid) = parse_ppid(&stat) {
            by_parent.entry(ppid).or_default().push(pid);
        }
    }
    by_parent
}

/// Whether `pid` has exited and waits to be reaped (or is gone already).
pub fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat_fields(&stat)?.next().map(|state| state == "Z"))
        .unwrap_or(true)
}

/// The ppid field of a /proc/<pid>/stat line: "pid (comm) state ppid ...". comm may hold spaces
/// and parentheses, so the fields are counted from its last ')'.
fn parse_ppid(stat: &str) -> Option<i32> {
    stat_fields(stat)?.nth(1)?.parse().ok()
}

/// The fields of a /proc/<pid>/stat line after "pid (comm)", from the state on.
fn stat_fields(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat[stat.rfind(')')? + 1..].split_whitespace())
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    fn parses_ppid_with_tricky_comm() {
        assert_eq!(parse_ppid("42 (a) b (c)) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parse_ppid("1 (init) S 0 1 1"), Some(0));
        assert_eq!(parse_ppid("garbage"), None);
    }

    #[test]
    fn children_files_agree_with_ppids_and_the_tree_holds_grandchildren() {
        let mut child = Command::new("sh")
            .args(["-c", "sleep 60 & wait"])
            .spawn()
            .unwrap();
        let me = std::process::id() as i32;
        let shell = child.id() as i32;
        let found = |f: &dyn Fn() -> bool| {
            (0..200).any(|_| {
                std::thread::sleep(std::time::Duration::from_millis(5));
                f()
            })
        };
        assert!(
            found(&|| descendants_and_self(me).len() >= 3),
            "no grandchild"
        );
        assert!(
            children_by_ppid()
                .remove(&me)
                .unwrap_or_default()
                .contains(&shell)
        );
        if Path::new("/proc/thread-self/children").exists() {
            assert!(children_from_files(me).contains(&shell));
        }
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(shell), None);
        for pid in descendants_and_self(shell).into_iter().rev() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        child.wait().unwrap();
    }
}
