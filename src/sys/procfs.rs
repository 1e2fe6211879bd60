//! Everything the crate reads from `/proc` about other processes: a task's
//! scheduler state and parent (`stat`), its thread group, tracer, groups
//! and memory (`status`), and the tasks and children of a tree (`task/`).
//!
//! One rule for "is it alive": a zombie is not. A zombie has finished
//! running — the kernel already released its memory, files and namespaces
//! (`exit_notify` comes after `exit_namespaces`) — and only keeps its pid
//! and exit status until its parent reaps it. No signal reaches it, no
//! tracer can seize it, CRIU has nothing of it to dump. Every question the
//! crate asks (is the service still running, is a killed tree gone, does a
//! task still need a tracer, is a thread frozen yet) wants "has it ended",
//! so [`TaskState::has_ended`] and [`alive`] count zombies as ended. (That
//! its pid stays taken until the reap is a different question, which the
//! PID namespace of every sandbox makes moot.)

use nix::unistd::Pid;
use std::io;
use std::path::PathBuf;

/// The scheduler state letter of `/proc/<pid>/stat` (proc(5)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// `R`
    Running,
    /// `S`: interruptible sleep (also a task blocked in a seccomp notification).
    Sleeping,
    /// `D`
    DiskSleep,
    /// `T`: stopped by a signal (group-stop), what CRIU wants to seize.
    Stopped,
    /// `t`: a ptrace-stop.
    TracingStop,
    /// `Z`
    Zombie,
    /// `X` (and the old `x`): being torn down.
    Dead,
    /// `I`
    Idle,
    /// Any other letter (`P`, `W`, `K`, ... on some kernels).
    Other(char),
}

impl TaskState {
    pub fn from_letter(c: char) -> TaskState {
        match c {
            'R' => TaskState::Running,
            'S' => TaskState::Sleeping,
            'D' => TaskState::DiskSleep,
            'T' => TaskState::Stopped,
            't' => TaskState::TracingStop,
            'Z' => TaskState::Zombie,
            'X' | 'x' => TaskState::Dead,
            'I' => TaskState::Idle,
            c => TaskState::Other(c),
        }
    }

    pub fn letter(self) -> char {
        match self {
            TaskState::Running => 'R',
            TaskState::Sleeping => 'S',
            TaskState::DiskSleep => 'D',
            TaskState::Stopped => 'T',
            TaskState::TracingStop => 't',
            TaskState::Zombie => 'Z',
            TaskState::Dead => 'X',
            TaskState::Idle => 'I',
            TaskState::Other(c) => c,
        }
    }

    /// Has the task finished running? Zombies have (see the module doc).
    pub fn has_ended(self) -> bool {
        matches!(self, TaskState::Zombie | TaskState::Dead)
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.letter())
    }
}

/// The fields of `/proc/<pid>/stat` the crate uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub comm: String,
    pub state: TaskState,
    pub ppid: i32,
}

/// Parses one `/proc/<pid>/stat` line: `pid (comm) state ppid ...`. The
/// command name may itself contain spaces and parentheses (a process may
/// name itself anything up to 15 bytes), so the fields that follow start
/// after the *last* `)`.
pub fn parse_stat(line: &str) -> Option<Stat> {
    let (head, rest) = line.rsplit_once(')')?;
    let (_, comm) = head.split_once('(')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    let mut letters = state.chars();
    let letter = letters.next()?;
    if letters.next().is_some() {
        return None;
    }
    let ppid = fields.next()?.parse().ok()?;
    Some(Stat {
        comm: comm.to_string(),
        state: TaskState::from_letter(letter),
        ppid,
    })
}

fn read(path: PathBuf) -> io::Result<String> {
    read_text(&path)
}

/// A /proc (or /sys) text file, whole. `read_to_string` sizes its buffer
/// by the file's size, which procfs reports as 0, so it reads 32 bytes,
/// then 32, 64, ... (8 reads for a mountinfo); this reads 4 KiB at a time
/// (one read for most, and no fstat).
pub fn read_text(path: impl AsRef<std::path::Path>) -> io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = Vec::with_capacity(4096);
    io::Read::read_to_end(&mut f, &mut buf)?;
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn malformed(what: &str, path: &std::path::Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} is not a {what} line as proc(5) describes it",
            path.display()
        ),
    )
}

fn stat_at(path: PathBuf) -> io::Result<Stat> {
    let text = read(path.clone())?;
    parse_stat(&text).ok_or_else(|| malformed("stat", &path))
}

/// `/proc/<pid>/stat`. `NotFound` when there is no such process (reaped).
pub fn stat(pid: Pid) -> io::Result<Stat> {
    if pid.as_raw() <= 0 {
        return Err(io::Error::from(io::ErrorKind::NotFound));
    }
    stat_at(PathBuf::from(format!("/proc/{pid}/stat")))
}

/// The state of thread `tid` of process `pid`; `None` once it is reaped.
pub fn task_state(pid: Pid, tid: Pid) -> Option<TaskState> {
    stat_at(PathBuf::from(format!("/proc/{pid}/task/{tid}/stat")))
        .ok()
        .map(|s| s.state)
}

/// Is `pid` a live process? A zombie is not (see the module doc).
pub fn alive(pid: Pid) -> bool {
    stat(pid).is_ok_and(|s| !s.state.has_ended())
}

/// The parent of `pid`, while it exists.
pub fn ppid(pid: Pid) -> Option<Pid> {
    stat(pid).ok().map(|s| Pid::from_raw(s.ppid))
}

/// The fields of `/proc/<pid>/status` the crate uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub tgid: Option<Pid>,
    /// 0 when nobody traces it.
    pub tracer_pid: Option<i32>,
    pub groups: Vec<u32>,
    pub vm_rss_kib: Option<u64>,
    /// The pid in each PID namespace, outermost first ("NSpid"): a
    /// namespace's init ends in 1.
    pub ns_pids: Vec<i32>,
    /// Effective and bounding capability sets (bit N is capability N).
    pub cap_eff: Option<u64>,
    pub cap_bnd: Option<u64>,
}

/// Parses `/proc/<pid>/status` ("Key:\tvalue" lines).
pub fn parse_status(text: &str) -> Status {
    let mut s = Status::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "Tgid" => s.tgid = value.parse().ok().map(Pid::from_raw),
            "TracerPid" => s.tracer_pid = value.parse().ok(),
            "Groups" => {
                s.groups = value
                    .split_whitespace()
                    .filter_map(|g| g.parse().ok())
                    .collect()
            }
            "NSpid" => {
                s.ns_pids = value
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            }
            // "VmRSS:\t   27392 kB"
            "VmRSS" => s.vm_rss_kib = value.strip_suffix("kB").and_then(|n| n.trim().parse().ok()),
            "CapEff" => s.cap_eff = u64::from_str_radix(value, 16).ok(),
            "CapBnd" => s.cap_bnd = u64::from_str_radix(value, 16).ok(),
            _ => {}
        }
    }
    s
}

/// `/proc/<pid>/status` (also readable for a thread id).
pub fn status(pid: Pid) -> io::Result<Status> {
    if pid.as_raw() <= 0 {
        return Err(io::Error::from(io::ErrorKind::NotFound));
    }
    read(PathBuf::from(format!("/proc/{pid}/status"))).map(|t| parse_status(&t))
}

/// The thread group (process) task `tid` belongs to; `None` once it is
/// reaped.
pub fn tgid(tid: Pid) -> Option<Pid> {
    status(tid).ok().and_then(|s| s.tgid)
}

/// Every thread of every process in the tree under `root`, parents first
/// (each process's threads sorted). A descendant that exits while the tree
/// is listed is left out; `root` itself must exist.
pub fn tree_tasks(root: Pid) -> io::Result<Vec<(Pid, Vec<Pid>)>> {
    let mut out = Vec::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        let dir = match std::fs::read_dir(format!("/proc/{pid}/task")) {
            Ok(d) => d,
            Err(e) if pid != root && e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut tids = Vec::new();
        for e in dir.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let tid = Pid::from_raw(tid);
            tids.push(tid);
            // A thread that exited meanwhile has no children file any more.
            if let Ok(ch) = read(PathBuf::from(format!("/proc/{pid}/task/{tid}/children"))) {
                queue.extend(parse_pids(&ch));
            }
        }
        tids.sort();
        out.push((pid, tids));
    }
    Ok(out)
}

/// The resident set of every process in the tree under `root`, summed
/// (KiB, as each `/proc/<pid>/status` tells it: pages shared between
/// them count once per process). None when `root` is gone.
pub fn tree_rss_kib(root: Pid) -> Option<u64> {
    let tree = tree_tasks(root).ok()?;
    Some(
        tree.iter()
            .filter_map(|(pid, _)| status(*pid).ok().and_then(|s| s.vm_rss_kib))
            .sum(),
    )
}

fn parse_pids(text: &str) -> impl Iterator<Item = Pid> + '_ {
    text.split_whitespace()
        .filter_map(|c| c.parse().ok())
        .map(Pid::from_raw)
}

/// The machine's CPU time from the first line of /proc/stat, in ticks:
/// (stolen by the hypervisor, all). Guest time is already inside user time
/// (proc(5)), so it is not added again.
pub fn parse_cpu_steal(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let steal = *v.get(7)?;
    Some((steal, v.iter().take(8).sum()))
}

pub fn cpu_steal() -> Option<(u64, u64)> {
    parse_cpu_steal(&read_text("/proc/stat").ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_after_the_last_parenthesis() {
        // Lines read on this kernel: a plain command, then two processes
        // that named themselves (PR_SET_NAME) with spaces and parentheses,
        // stopped and as zombies.
        let s = parse_stat("24346 (cat) R 24344 24344 15347 0 -1 4194304 100 0 0 0 0 0 0 0 20 0 1 0 54807 3133440 393 18446744073709551615 93869358710784 93869358730665 140723781884032 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0 93869358746672 93869358748288 93870405181440 140723781888738 140723781888758 140723781888758 140723781890027 0\n").unwrap();
        assert_eq!(s.comm, "cat");
        assert_eq!(s.state, TaskState::Running);
        assert_eq!(s.ppid, 24344);
        let stopped = "24269 (a b) c) T 24222 24220 15347 0 -1 4194368 267 0 0 0 0 0 0 0 20 0 1 0 54569 17309696 2682 18446744073709551615 94551417696256 94551417696597 140731050905904 0 0 0 0 16781312 2 1 0 0 17 1 0 0 0 0 0 94551417707952 94551417708568 94552281296896 140731050912001 140731050912044 140731050912044 140731050913743 19\n";
        let s = parse_stat(stopped).unwrap();
        assert_eq!(s.comm, "a b) c");
        assert_eq!(s.state, TaskState::Stopped);
        assert_eq!(s.ppid, 24222);
        let zombie = "24269 (a b) c) Z 24222 24220 15347 0 -1 4228172 267 0 0 0 0 0 0 0 20 0 1 0 54569 0 0 18446744073709551615 0 0 0 0 0 0 0 16781312 2 1 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 9\n";
        let s = parse_stat(zombie).unwrap();
        assert_eq!(s.state, TaskState::Zombie);
        assert!(s.state.has_ended(), "a zombie has ended");
        let s = parse_stat("24280 ((sd-pam)) Z 24222 24220 15347 0 -1 4227148 268 0 0 0 0 0 0 0 20 0 1 0 54599 0 0 18446744073709551615 0 0 0 0 0 0 0 16781312 2 1 0 0 17 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n").unwrap();
        assert_eq!(s.comm, "(sd-pam)");
        assert_eq!(s.ppid, 24222);
        assert_eq!(
            parse_stat("79 (t) t 1 0").unwrap().state,
            TaskState::TracingStop
        );
        assert!(!TaskState::TracingStop.has_ended());
        assert!(!TaskState::Stopped.has_ended());
        assert!(TaskState::from_letter('X').has_ended());
        assert!(TaskState::from_letter('x').has_ended());
        assert_eq!(TaskState::from_letter('P'), TaskState::Other('P'));
        assert_eq!(TaskState::Stopped.to_string(), "T");
    }

    #[test]
    fn malformed_stat_lines_are_refused() {
        assert_eq!(parse_stat(""), None);
        assert_eq!(parse_stat("12 (no close paren S 1"), None);
        assert_eq!(parse_stat("12 (x)"), None, "no state");
        assert_eq!(parse_stat("12 (x) S"), None, "no ppid");
        assert_eq!(parse_stat("12 (x) SS 1"), None, "a state is one letter");
        assert_eq!(parse_stat("12 (x) S one"), None);
    }

    #[test]
    fn status_fields() {
        // A thread's status: Tgid names its process, Pid the thread.
        let text = "Name:\tpython3\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4321\nNgid:\t0\nPid:\t4325\nPPid:\t1\nTracerPid:\t0\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nFDSize:\t64\nGroups:\t4 24 27 \nVmPeak:\t   31524 kB\nVmRSS:\t   27392 kB\nThreads:\t3\n";
        let s = parse_status(text);
        assert_eq!(s.tgid, Some(Pid::from_raw(4321)));
        assert_eq!(s.tracer_pid, Some(0));
        assert_eq!(s.groups, vec![4, 24, 27]);
        assert_eq!(s.vm_rss_kib, Some(27392));
        assert_eq!(s.cap_bnd, None);
        // This kind of machine's root: every capability but CAP_SYS_RESOURCE (24).
        let caps = parse_status("CapEff:\t000001fffeffffff\nCapBnd:\t000001fffeffffff\n");
        assert_eq!(caps.cap_bnd, Some(0x1ff_feff_ffff));
        assert_eq!(caps.cap_eff.map(|c| c & (1 << 24)), Some(0));
        // No supplementary groups is "Groups:\t \n" here.
        let empty = parse_status("Name:\tkthreadd\nGroups:\t \n");
        assert_eq!(empty, Status::default());
    }

    #[test]
    fn this_process_as_proc_shows_it() {
        let me = nix::unistd::getpid();
        assert!(alive(me));
        assert_eq!(ppid(me), Some(nix::unistd::getppid()));
        assert!(!alive(Pid::from_raw(0)));
        assert!(!alive(Pid::from_raw(-1)));
        assert_eq!(tgid(me), Some(me));
        assert!(status(me).unwrap().vm_rss_kib.is_some());
        let tree = tree_tasks(me).unwrap();
        assert_eq!(tree[0].0, me);
        assert!(tree[0].1.contains(&me), "the main thread is listed");
        assert!(matches!(
            task_state(me, me),
            Some(TaskState::Running | TaskState::Sleeping)
        ));
    }

    #[test]
    fn a_zombie_is_not_alive() {
        // A child that exits and that nobody waits for yet: a zombie.
        let mut proc = std::process::Command::new("true")
            .spawn()
            .expect("run true(1)");
        let child = crate::sys::child_pid(&proc);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !matches!(
            stat(child),
            Ok(Stat {
                state: TaskState::Zombie,
                ..
            })
        ) && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(stat(child).unwrap().state, TaskState::Zombie);
        assert!(!alive(child), "an unreaped zombie counts as ended");
        proc.wait().expect("reap the zombie");
        assert!(!alive(child));
    }

    #[test]
    fn cpu_steal_is_read_from_the_first_line() {
        let stat = "cpu  100 0 50 800 10 0 5 35 20 0\ncpu0 50 0 25 400 5 0 2 18 10 0\n";
        assert_eq!(super::parse_cpu_steal(stat), Some((35, 1000)));
        assert_eq!(super::parse_cpu_steal("cpu0 1 2 3\n"), None);
        assert_eq!(super::parse_cpu_steal("cpu  1 2 3\n"), None);
        assert_eq!(super::parse_cpu_steal("cpu  1 x 3 4 5 6 7 8\n"), None);
    }
}
