//! Processes: running a closure in a forked child, thread ids, identity.

use std::panic::{AssertUnwindSafe, catch_unwind};

use rustix::io::Errno;
use rustix::process::{Pid, WaitOptions};

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildOutcome {
    /// It exited with this status.
    Exited(i32),
    /// A signal killed it (for example `SIGBUS` = 7 from a poisoned page).
    Signaled(i32),
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

    /// Waits for the child to end.
    pub fn wait(mut self) -> Result<ChildOutcome, Errno> {
        self.reaped = true;
        wait_for(self.pid)
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
/// by side until [`Child::wait`] reaps the child (dropping the handle kills
/// and reaps it).
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
/// running exit handlers or returning into the caller's frames), then waits for
/// the child and returns how it ended.
///
/// The child is a copy of this process with only the calling thread: `f` must
/// not wait on locks that other threads of the parent may have held at the fork
/// (printing to a shared stream, for example). Memory allocation is safe: the C
/// library takes its allocator locks around `fork`. If the parent's registrations
/// have `UFFD_FEATURE_EVENT_FORK`, the fork blocks until the FORK event is read.
pub fn run_in_child<F: FnOnce() -> i32>(f: F) -> Result<ChildOutcome, Errno> {
    spawn_child(f)?.wait()
}

fn wait_for(pid: Pid) -> Result<ChildOutcome, Errno> {
    loop {
        match rustix::process::waitpid(Some(pid), WaitOptions::empty()) {
            Ok(Some((_, status))) => {
                if let Some(sig) = status.terminating_signal() {
                    return Ok(ChildOutcome::Signaled(sig));
                }
                if let Some(code) = status.exit_status() {
                    return Ok(ChildOutcome::Exited(code));
                }
            }
            Ok(None) => {}
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
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
        assert_eq!(run_in_child(|| 3).unwrap(), ChildOutcome::Exited(3));
        assert_eq!(run_in_child(|| panic!("boom")).unwrap(), ChildOutcome::Exited(CHILD_PANICKED));
    }
}
