//! Child processes that never outlive the builder, and the kernel's figures about them.
//!
//! Every `nix` the builder runs is started here:
//! - by one long-lived spawner thread, with `PR_SET_PDEATHSIG = SIGKILL`: the kernel sends the
//!   signal when the thread that forked the child exits, so the fork happens on a thread that
//!   lives as long as the builder process, and the child dies with the builder on any death,
//!   `kill -9` included. (nix's own derivation builders die with nix: nix sets the same flag.)
//! - optionally with `RLIMIT_DATA`, so an evaluation cannot grow past its memory limit at all:
//!   the kernel refuses the allocation and nix stops with "out of memory";
//! - in a process group of its own, so stopping it reaches its helpers;
//! - with a pid file under `<state_dir>/processes/` while it runs, so a builder that starts after
//!   one that died ends whatever that one left ([`end_leftovers`]) — the pid file names the boot
//!   and the start time, so a pid the kernel has given to another process since is left alone.
//!
//! The child is reaped with `wait4`, which also returns its peak resident memory (`ru_maxrss`):
//! the kernel's own figure, not a sample.
//!
//! This is the one module with `unsafe` code: `pre_exec` (run between fork and exec) and
//! `wait4` have no safe wrapper in `std`, `tokio` or `nix` (docs/decisions/procs-child-processes.md).
#![allow(unsafe_code)]

use std::ffi::OsStr;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{ChildStderr, ChildStdin, ChildStdout};
use tracing::warn;

/// How long a stopped child gets to end its own helpers after SIGTERM before its group is
/// SIGKILLed.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// How a child ended, with the kernel's accounting of it.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    /// `Some(code)` when it exited, `None` when a signal ended it.
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// Its peak resident memory in bytes (`ru_maxrss` from `wait4`).
    pub peak_rss: u64,
}

impl Exit {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// A running child, leader of its own process group. Dropping it before it was reaped stops the
/// whole group: SIGTERM, then SIGKILL after [`STOP_GRACE`].
pub struct Child {
    pid: Pid,
    reaped: Arc<AtomicBool>,
    exit: Option<tokio::task::JoinHandle<io::Result<Exit>>>,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
}

/// What the spawner thread is asked to do: start this command, answer on this channel.
type SpawnRequest = (
    Command,
    tokio::sync::oneshot::Sender<io::Result<std::process::Child>>,
);

/// The spawner thread's inbox; the thread runs as long as the process.
fn spawner() -> io::Result<std::sync::mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<Option<std::sync::mpsc::Sender<SpawnRequest>>>> =
        OnceLock::new();
    let slot = SPAWNER.get_or_init(|| Mutex::new(None));
    let mut slot = crate::lock(slot);
    if let Some(sender) = slot.as_ref() {
        return Ok(sender.clone());
    }
    let (sender, requests) = std::sync::mpsc::channel::<SpawnRequest>();
    std::thread::Builder::new()
        .name("child-spawner".into())
        .spawn(move || {
            for (mut command, reply) in requests {
                let _ = reply.send(command.spawn());
            }
        })?;
    *slot = Some(sender.clone());
    Ok(sender)
}

/// Starts `command` (its stdout and stderr should be piped) as described in the module docs.
/// `data_limit` caps the child's data segment (`RLIMIT_DATA`, bytes); `pid_dir` is where its pid
/// file goes. Must be called inside a tokio runtime.
pub async fn spawn(
    mut command: Command,
    data_limit: Option<u64>,
    pid_dir: Option<&Path>,
) -> io::Result<Child> {
    let builder = std::process::id();
    command.process_group(0);
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (prctl, getppid, setrlimit); it allocates nothing (errors are raw errnos).
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            // The builder may have died between fork and prctl: then nobody would kill us.
            if nix::unistd::getppid().as_raw().unsigned_abs() != builder {
                return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            if let Some(bytes) = data_limit {
                nix::sys::resource::setrlimit(
                    nix::sys::resource::Resource::RLIMIT_DATA,
                    bytes,
                    bytes,
                )
                .map_err(io::Error::from)?;
            }
            Ok(())
        });
    }
    let (reply, spawned) = tokio::sync::oneshot::channel();
    spawner()?
        .send((command, reply))
        .map_err(|_| io::Error::other("the process spawner thread is gone"))?;
    let mut child = spawned
        .await
        .map_err(|_| io::Error::other("the process spawner thread is gone"))??;
    let pid = Pid::from_raw(i32::try_from(child.id()).map_err(io::Error::other)?);
    let pid_file = pid_dir.and_then(|dir| write_pid_file(dir, pid));
    let stdin = child.stdin.take().map(ChildStdin::from_std).transpose()?;
    let stdout = child.stdout.take().map(ChildStdout::from_std).transpose()?;
    let stderr = child.stderr.take().map(ChildStderr::from_std).transpose()?;
    let reaped = Arc::new(AtomicBool::new(false));
    let exit = {
        let reaped = reaped.clone();
        // The waiter runs to the end even when the `Child` is dropped, so every child is reaped
        // and its pid file removed.
        tokio::task::spawn_blocking(move || {
            let exit = wait4(pid);
            reaped.store(true, Ordering::SeqCst);
            if let Some(file) = pid_file {
                let _ = std::fs::remove_file(file);
            }
            exit
        })
    };
    Ok(Child {
        pid,
        reaped,
        exit: Some(exit),
        stdin,
        stdout,
        stderr,
    })
}

impl Child {
    /// Waits for the child to end.
    pub async fn wait(&mut self) -> io::Result<Exit> {
        let Some(exit) = self.exit.as_mut() else {
            return Err(io::Error::other("child already waited for"));
        };
        let exit = exit.await.map_err(io::Error::other)?;
        self.exit = None;
        exit
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.reaped.load(Ordering::SeqCst) {
            return; // nothing left to stop, and the pid may belong to someone else by now
        }
        stop_group(self.pid);
    }
}

/// SIGTERM to the group `pgid` (nix then stops its derivation builders, which run in sessions of
/// their own that a signal to this group would not reach), SIGKILL to what is left after
/// [`STOP_GRACE`]. Returns at once; a thread waits out the grace.
fn stop_group(pgid: Pid) {
    let _ = killpg(pgid, Signal::SIGTERM);
    std::thread::spawn(move || {
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            // Signal 0 probes whether any process of the group is left.
            if killpg(pgid, None).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = killpg(pgid, Signal::SIGKILL);
    });
}

/// Whether a child (nix or git) inherits the builder's environment variable `key`: where to find
/// programs and home, locale-independent basics, proxies and CA bundles. Callers add what their
/// program needs on top; everything else (credentials, `GIT_*`, askpass helpers) is dropped.
pub fn inherits_env(key: &str) -> bool {
    matches!(
        key,
        "PATH"
            | "HOME"
            | "USER"
            | "LOGNAME"
            | "TMPDIR"
            | "TZ"
            | "http_proxy"
            | "https_proxy"
            | "no_proxy"
            | "all_proxy"
            | "HTTP_PROXY"
            | "HTTPS_PROXY"
            | "NO_PROXY"
            | "ALL_PROXY"
    ) || key.starts_with("XDG_")
        || key.starts_with("SSL_CERT")
}

/// Reads a child's pipe to its end, keeping the first `limit` bytes and dropping the rest, so
/// the child never blocks on a full pipe and the builder's memory stays bounded. A read error
/// ends the read with what was kept.
pub async fn read_head(pipe: Option<impl AsyncRead + Unpin>, limit: usize) -> Vec<u8> {
    read_keeping(pipe, |kept, chunk| {
        let room = limit.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
    })
    .await
}

/// Reads a child's pipe to its end, keeping the last `limit` bytes (where an error message is).
pub async fn read_tail(pipe: Option<impl AsyncRead + Unpin>, limit: usize) -> Vec<u8> {
    read_keeping(pipe, |kept, chunk| {
        kept.extend_from_slice(chunk);
        if kept.len() > limit {
            kept.drain(..kept.len() - limit);
        }
    })
    .await
}

/// Reads `pipe` to its end (or its first error), handing each chunk to `keep` with what is kept.
async fn read_keeping(
    pipe: Option<impl AsyncRead + Unpin>,
    mut keep: impl FnMut(&mut Vec<u8>, &[u8]),
) -> Vec<u8> {
    let mut kept = Vec::new();
    let Some(mut pipe) = pipe else {
        return kept;
    };
    let mut buffer = [0u8; 8192];
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => keep(&mut kept, &buffer[..n]),
        }
    }
}

/// `wait4(pid)`: blocks until the child ends and reaps it.
fn wait4(pid: Pid) -> io::Result<Exit> {
    let mut status: nix::libc::c_int = 0;
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut usage: nix::libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: both pointers are to live, writable locals of the right types.
        let result = unsafe { nix::libc::wait4(pid.as_raw(), &mut status, 0, &mut usage) };
        if result == pid.as_raw() {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    let exited = nix::libc::WIFEXITED(status);
    let signaled = nix::libc::WIFSIGNALED(status);
    Ok(Exit {
        code: exited.then(|| nix::libc::WEXITSTATUS(status)),
        signal: signaled.then(|| nix::libc::WTERMSIG(status)),
        // Linux reports ru_maxrss in KiB.
        peak_rss: u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024,
    })
}

/// `boot_id start_time` of a running process: names it uniquely across pid reuse and reboots.
fn identity(pid: Pid) -> Option<String> {
    let boot = procfs::sys::kernel::random::boot_id().ok()?;
    let stat = procfs::process::Process::new(pid.as_raw())
        .ok()?
        .stat()
        .ok()?;
    if stat.state == 'Z' {
        return None; // a zombie is already dead
    }
    Some(format!("{boot} {}", stat.starttime))
}

fn write_pid_file(dir: &Path, pid: Pid) -> Option<PathBuf> {
    let identity = identity(pid)?;
    let file = dir.join(pid.to_string());
    let written = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&file, identity));
    match written {
        Ok(()) => Some(file),
        Err(err) => {
            warn!(dir = %dir.display(), error = %err, "cannot write a pid file; a builder that starts after a crash cannot end this process");
            None
        }
    }
}

/// Ends the process groups that a builder which died left running, as named by the pid files in
/// `dir`, and removes the files: the group of a child still running, or of one that died with the
/// builder while its helpers live on. A pid file whose group is gone, or whose pid now belongs to
/// another process (another start time or boot), is only removed. When any pid file was left,
/// also ends orphaned derivation builders ([`end_orphaned_derivation_builders`]). Returns the
/// pids it ended. Blocks up to [`STOP_GRACE`] per process that needs a SIGKILL.
pub fn end_leftovers(dir: &Path) -> Vec<u32> {
    let mut ended = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return ended; // no directory: no builder ran here yet
    };
    let mut any_left = false;
    for entry in entries.flatten() {
        any_left = true;
        let file = entry.path();
        let pid = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
            .filter(|pid| *pid > 1)
            .map(Pid::from_raw);
        let recorded = std::fs::read_to_string(&file).unwrap_or_default();
        if let Some(pid) = pid {
            let left = match identity(pid) {
                Some(now) => now == recorded.trim(),
                // The leader is gone, but its helpers (git's transport, a nix substituter) may
                // live on in its group: the kernel gives no new process a pid that is still a
                // live group's id, so a group with this id is the one the leader made.
                None => killpg(pid, None).is_ok(),
            };
            if left {
                warn!(
                    pid = pid.as_raw(),
                    "ending a process group a previous builder left running"
                );
                let _ = killpg(pid, Signal::SIGTERM);
                let deadline = Instant::now() + STOP_GRACE;
                while killpg(pid, None).is_ok() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = killpg(pid, Signal::SIGKILL);
                ended.push(pid.as_raw().unsigned_abs());
            }
        }
        let _ = std::fs::remove_file(&file);
    }
    if any_left {
        ended.extend(end_orphaned_derivation_builders());
    }
    ended
}

/// Ends derivation builders whose nix is gone. Without a nix daemon (which stops a build when its
/// client goes), nix runs each derivation's builder in a session of its own, without a
/// parent-death signal, so a builder can outlive the nix that a dead builder's death took along,
/// and write the output path under the next build. Such a process is a session leader whose
/// parent is now pid 1 and whose environment has `NIX_BUILD_TOP`: no nix will ever register
/// what it makes (nix itself kills it when it next uses the same build user). Returns the
/// sessions ended.
fn end_orphaned_derivation_builders() -> Vec<u32> {
    let mut ended = Vec::new();
    let Ok(processes) = procfs::process::all_processes() else {
        return ended;
    };
    for process in processes.flatten() {
        let pid = process.pid();
        let Ok(stat) = process.stat() else {
            continue;
        };
        if stat.ppid != 1 || stat.session != pid {
            continue;
        }
        let builds = process
            .environ()
            .is_ok_and(|environ| environ.contains_key(OsStr::new("NIX_BUILD_TOP")));
        if builds {
            warn!(pid, "ending a derivation builder whose nix is gone");
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            ended.push(pid.unsigned_abs());
        }
    }
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper() -> std::process::Child {
        Command::new("/bin/sleep")
            .arg("300")
            .process_group(0)
            .spawn()
            .expect("sleep starts")
    }

    /// A pid file that names a live process of ours ends it; one whose pid now belongs to a
    /// process started at another time leaves that process alone. Both files are removed.
    #[test]
    fn leftovers_are_ended_only_when_they_are_ours() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut ours = sleeper();
        let mut stranger = sleeper();
        let ours_pid = Pid::from_raw(ours.id() as i32);
        let stranger_pid = Pid::from_raw(stranger.id() as i32);
        write_pid_file(dir.path(), ours_pid).expect("pid file");
        let file = dir.path().join(stranger_pid.to_string());
        let identity = identity(stranger_pid).expect("identity");
        std::fs::write(&file, format!("{identity}1")).expect("pid file");

        let ended = end_leftovers(dir.path());

        // Orphaned derivation builders anywhere on the machine are ended too (another test's
        // killed builder may have left one): only ours and the stranger are this test's.
        assert!(ended.contains(&(ours_pid.as_raw() as u32)), "{ended:?}");
        assert!(
            !ended.contains(&(stranger_pid.as_raw() as u32)),
            "{ended:?}"
        );
        let status = ours.wait().expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(15)
        );
        assert!(stranger.try_wait().expect("try_wait").is_none());
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
        let _ = stranger.kill();
        let _ = stranger.wait();
    }

    /// The peak memory comes from the kernel at exit, however short the child lived; the data
    /// limit makes an allocation past it fail inside the child.
    #[tokio::test]
    async fn peak_memory_and_data_limit_come_from_the_kernel() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut command = Command::new("/bin/sh");
        command.args(["-c", "exit 3"]);
        let mut child = spawn(command, None, Some(dir.path())).await.expect("spawn");
        let exit = child.wait().await.expect("wait");
        assert_eq!(exit.code, Some(3));
        assert!(exit.peak_rss > 0, "{exit:?}");
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);

        // 64 MiB of data in a shell variable, under a 16 MiB limit.
        let mut command = Command::new("/bin/sh");
        command.args([
            "-c",
            "x=$(/usr/bin/head -c 67108864 /dev/zero | /usr/bin/tr '\\0' a); echo ${#x}",
        ]);
        command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = spawn(command, Some(16 << 20), None).await.expect("spawn");
        let exit = child.wait().await.expect("wait");
        assert!(!exit.success(), "{exit:?}");
        assert!(exit.peak_rss < 32 << 20, "{exit:?}");
    }
}
