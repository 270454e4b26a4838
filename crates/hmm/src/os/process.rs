//! Processes: running a closure in a forked child, thread ids, identity.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::process::{Pid, WaitOptions};

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildOutcome {
    /// It exited with this status.
    Exited(i32),
    /// A signal killed it (for example `SIGBUS` = 7 from a poisoned page).
    Signaled(i32),
    /// It was still running when the time it was given ran out, and was
    /// killed (`SIGKILL`) and reaped.
    TimedOut(Duration),
}

/// Exit status of a child whose closure panicked.
pub const CHILD_PANICKED: i32 = 101;

/// A forked child that runs on while the parent goes on (see [`spawn_child`]).
#[derive(Debug)]
pub struct Child {
    pid: Pid,
    reaped: bool,
}

impl Child {
    /// The child's process id.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw_nonzero().get()
    }

    /// Waits up to `limit` for the child to end. A child still running then
    /// is killed and reaped, and the outcome is [`ChildOutcome::TimedOut`]:
    /// a parent never waits for ever on a child that hangs.
    pub fn wait_within(mut self, limit: Duration) -> Result<ChildOutcome, Errno> {
        let deadline = Instant::now() + limit;
        let mut pause = Duration::from_micros(50);
        loop {
            if let Some(out) = try_wait(self.pid)? {
                self.reaped = true;
                return Ok(out);
            }
            let now = Instant::now();
            if now >= deadline {
                // Dropping the handle kills and reaps the child.
                return Ok(ChildOutcome::TimedOut(limit));
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }
}

impl Drop for Child {
    /// A child not waited for is killed and reaped (a parent that gives up on
    /// it, on a failed assertion say, must not hang on it).
    fn drop(&mut self) {
        if !self.reaped {
            let _ = rustix::process::kill_process(self.pid, rustix::process::Signal::KILL);
            let _ = wait_for(self.pid);
        }
    }
}

/// Forks and runs `f` in the child, which then exits with its result (as
/// [`run_in_child`]), but returns at once: the parent and the child run side
/// by side until [`Child::wait_within`] reaps the child (dropping the handle
/// kills and reaps it).
pub fn spawn_child<F: FnOnce() -> i32>(f: F) -> Result<Child, Errno> {
    // SAFETY: `fork` is called through the C library so that its at-fork handlers
    // keep the allocator and thread bookkeeping consistent in the child.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ));
    }
    if pid == 0 {
        let code = catch_unwind(AssertUnwindSafe(f)).unwrap_or(CHILD_PANICKED);
        // SAFETY: `_exit` ends the child at once; no destructor of the parent's
        // state runs twice and no frame of the caller is returned into.
        unsafe { libc::_exit(code) };
    }
    Ok(Child { pid: Pid::from_raw(pid).ok_or(Errno::CHILD)?, reaped: false })
}

/// Registers handlers the C library runs around every `fork()` it makes
/// (`pthread_atfork`): `prepare` in the forking thread before the fork,
/// `parent` in it after, `child` in the child's only thread. They stay
/// registered for the life of the process. Forks made without the C library
/// (a raw `clone` system call) run none of them.
pub fn at_fork(
    prepare: extern "C" fn(),
    parent: extern "C" fn(),
    child: extern "C" fn(),
) -> Result<(), Errno> {
    // SAFETY: the three are plain functions of the program that live as long as
    // it; `pthread_atfork` only stores them.
    let r = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if r == 0 { Ok(()) } else { Err(Errno::from_raw_os_error(r)) }
}

/// Forks, runs `f` in the child and exits the child with its result (without
/// running exit handlers or returning into the caller's frames), then waits up
/// to `limit` for the child and returns how it ended: a child still running
/// then is killed, and the outcome is [`ChildOutcome::TimedOut`].
///
/// The child is a copy of this process with only the calling thread: `f` must
/// not wait on locks that other threads of the parent may have held at the fork
/// (printing to a shared stream, for example). Memory allocation is safe: the C
/// library takes its allocator locks around `fork`. If the parent's registrations
/// have `UFFD_FEATURE_EVENT_FORK`, the fork blocks until the FORK event is read.
pub fn run_in_child<F: FnOnce() -> i32>(limit: Duration, f: F) -> Result<ChildOutcome, Errno> {
    spawn_child(f)?.wait_within(limit)
}

/// How `pid` ended, once it has: blocks until it does.
fn wait_for(pid: Pid) -> Result<ChildOutcome, Errno> {
    loop {
        if let Some(out) = reap(pid, WaitOptions::empty())? {
            return Ok(out);
        }
    }
}

/// How `pid` ended, if it has; `None` while it runs.
fn try_wait(pid: Pid) -> Result<Option<ChildOutcome>, Errno> {
    reap(pid, WaitOptions::NOHANG)
}

fn reap(pid: Pid, options: WaitOptions) -> Result<Option<ChildOutcome>, Errno> {
    loop {
        match rustix::process::waitpid(Some(pid), options) {
            Ok(Some((_, status))) => {
                if let Some(sig) = status.terminating_signal() {
                    return Ok(Some(ChildOutcome::Signaled(sig)));
                }
                if let Some(code) = status.exit_status() {
                    return Ok(Some(ChildOutcome::Exited(code)));
                }
                // Stopped or continued: not an end; look again.
                if options.contains(WaitOptions::NOHANG) {
                    return Ok(None);
                }
            }
            Ok(None) => return Ok(None),
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
}

/// This process's id (asked of the kernel each time: it changes in a
/// forked child).
pub fn pid() -> u32 {
    rustix::process::getpid().as_raw_nonzero().get().unsigned_abs()
}

/// The calling thread's kernel id (what `UFFD_FEATURE_THREAD_ID` reports).
pub fn thread_id() -> u32 {
    rustix::thread::gettid().as_raw_nonzero().get().unsigned_abs()
}

/// Whether the process runs with effective uid 0.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The kernel's release string (`uname -r`).
pub fn kernel_release() -> String {
    rustix::system::uname().release().to_string_lossy().into_owned()
}

/// The system page size.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_exit_codes_and_panics_are_reported() {
        let limit = Duration::from_secs(30);
        assert_eq!(run_in_child(limit, || 3).unwrap(), ChildOutcome::Exited(3));
        assert_eq!(
            run_in_child(limit, || panic!("boom")).unwrap(),
            ChildOutcome::Exited(CHILD_PANICKED)
        );
    }

    #[test]
    fn a_child_past_its_time_is_killed_and_reported() {
        let limit = Duration::from_millis(200);
        let out = run_in_child(limit, || {
            std::thread::sleep(Duration::from_secs(600));
            0
        })
        .unwrap();
        assert_eq!(out, ChildOutcome::TimedOut(limit));
    }
}
