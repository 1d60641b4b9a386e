//! What the tests read of other processes in /proc.

/// The parent of `pid`, from /proc/<pid>/stat ("pid (comm) state ppid ...": comm may hold spaces
/// and parentheses, so the fields are counted from its last ')').
pub fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, fields) = stat.rsplit_once(')')?;
    fields.split_whitespace().nth(1)?.parse().ok()
}
