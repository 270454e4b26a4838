//! The process's `SIGBUS` handler, for userfaultfd's SIGBUS mode
//! (`UFFD_FEATURE_SIGBUS`), and the futex waits it may make.
//!
//! In SIGBUS mode the kernel queues no fault message: a thread that touches a
//! missing page of a registered range gets `SIGBUS` (`BUS_ADRERR`, the
//! address in `si_addr`) at the faulting instruction, and whatever the
//! handler installs there before it returns is what the instruction finds
//! when it runs again. So the fault is served in the faulting thread itself,
//! with no second thread woken at all.
//!
//! One handler serves the process ([`install`]); it asks the hook that hmm
//! registered, and hands a signal that is not hmm's (another `si_code`, an
//! address the hook does not own) to the handler that was installed before
//! it, or to the default action (the process dies of `SIGBUS`, as it would
//! have without hmm). The interrupted code's `errno` is kept.
//!
//! # What may run in the handler
//!
//! The handler interrupts arbitrary code at an arbitrary instruction: a
//! store into managed memory by the application, by its allocator (a heap
//! hmm adopted), by a C library routine. So the hook must not allocate or
//! free, and must not take a lock that any code touching managed memory can
//! hold. hmm's own locks qualify by hmm's rule that no thread ever touches
//! managed memory while it holds one of them (which the service mode needs
//! too: the fault service takes the same locks to serve the touch). The
//! futex calls here, `write(2)` to an eventfd and the userfaultfd ioctls are
//! all async-signal-safe.
//!
//! # Copies that fail instead of faulting
//!
//! The same handler, and one for `SIGSEGV` (`install_fixups`), resume a
//! fault at `os::bytes::copy_fallible`'s instruction at
//! that routine's exit (see `os::bytes`), after the hook has had its
//! chance (a managed page the hook serves lets the copy go on). The
//! `SIGSEGV` handler does nothing else: every other `SIGSEGV` goes to the
//! handler installed before it (Rust's stack-overflow report, say), on the
//! alternate stack where the thread has one, as before.
//!
//! The handler runs on the thread's own stack (no `SA_ONSTACK`: the
//! alternate stacks Rust gives its threads are a few kilobytes, and the hook
//! stages a page on the stack), with `SIGBUS` blocked: a `SIGBUS` inside the
//! hook (a bug) kills the process at once instead of recursing.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};
use std::time::Duration;

use crate::addr::VirtAddr;

/// A `SIGBUS` the kernel raised for a userfaultfd fault in SIGBUS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusFault {
    /// The faulting address (not page-aligned).
    pub addr: VirtAddr,
    /// Whether the access was a write, where the architecture says so.
    pub write: Option<bool>,
    /// Whether the page was present (a write-protect fault) rather than
    /// missing, where the architecture says so.
    pub present: Option<bool>,
}

/// What the hook did with a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Served (or waited for): the instruction runs again.
    Retry,
    /// Not hmm's: the signal goes to the handler installed before, or kills
    /// the process.
    NotMine,
}

/// The hook: a plain function, so the handler reaches it with one load.
pub type Hook = fn(&BusFault) -> Verdict;

static HOOK: AtomicUsize = AtomicUsize::new(0);
static INSTALL: Once = Once::new();
/// The `sigaction` found before ours, set once before ours goes in.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
static INSTALLED: AtomicU32 = AtomicU32::new(0);
static INSTALL_ERRNO: AtomicU32 = AtomicU32::new(0);
/// The `SIGSEGV` `sigaction` found before ours.
static PREVIOUS_SEGV: OnceLock<libc::sigaction> = OnceLock::new();
static FIXUPS: Once = Once::new();
static FIXUPS_INSTALLED: AtomicU32 = AtomicU32::new(0);
/// Whether the replacement of a handler has been reported.
static REPLACED_TOLD: AtomicBool = AtomicBool::new(false);

/// Installs the process's `SIGBUS` handler (once) with `hook`. Every later
/// call must pass the same hook.
pub fn install(hook: Hook) -> std::io::Result<()> {
    HOOK.store(hook as usize, Ordering::Release);
    install_handler()
}

/// Installs the `SIGBUS` handler (once), with the hook if one was given.
fn install_handler() -> std::io::Result<()> {
    INSTALL.call_once(|| match install_once() {
        Ok(()) => INSTALLED.store(1, Ordering::Release),
        Err(e) => INSTALL_ERRNO.store(e.raw_os_error().unwrap_or(0) as u32, Ordering::Relaxed),
    });
    match INSTALLED.load(Ordering::Acquire) {
        1 => Ok(()),
        _ => Err(std::io::Error::from_raw_os_error(INSTALL_ERRNO.load(Ordering::Relaxed) as i32)),
    }
}

/// Installs (once) what `os::bytes::copy_fallible` needs: the `SIGBUS`
/// handler (with no hook until [`install`] gives one) and a `SIGSEGV` handler
/// that moves only that routine's faults. False if either could not be
/// installed, or if either has been replaced since (a handler the
/// application or another library installed later need not pass our faults
/// on): copies then go through the kernel. The check costs two `sigaction`
/// calls, less than the `process_vm_readv` it spares.
pub(crate) fn install_fixups() -> bool {
    if FIXUPS_INSTALLED.load(Ordering::Acquire) != 1 {
        install_fixups_once();
    }
    if FIXUPS_INSTALLED.load(Ordering::Acquire) != 1 {
        return false;
    }
    let ours = |sig: libc::c_int, handler: Action| {
        let mut now = empty_action();
        sigaction(sig, None, Some(&mut now)).is_ok() && now.sa_sigaction == handler as usize
    };
    let in_place = ours(libc::SIGSEGV, handle_segv) && ours(libc::SIGBUS, handle);
    if !in_place && !REPLACED_TOLD.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "another SIGSEGV or SIGBUS handler replaced hmm's: device copies of system memory \
             go through the kernel (process_vm_readv/writev) while it is in place"
        );
    }
    in_place
}

fn install_fixups_once() {
    FIXUPS.call_once(|| {
        // On the alternate stack where the thread has one, where the handler
        // before ours (Rust's stack-overflow report) expects to run.
        let flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK;
        let segv = || take_over(libc::SIGSEGV, handle_segv, flags, &PREVIOUS_SEGV);
        match install_handler().and_then(|()| segv()) {
            Ok(()) => FIXUPS_INSTALLED.store(1, Ordering::Release),
            Err(e) => {
                tracing::warn!(error = %e, "no fault fixups: device copies go through the kernel")
            }
        }
    });
}

extern "C" fn handle_segv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    if !super::bytes::fixup(ctx) {
        chain(PREVIOUS_SEGV.get(), sig, info, ctx);
    }
}

/// An all-zero `sigaction` (no handler, empty mask, no flags).
fn empty_action() -> libc::sigaction {
    // SAFETY: `sigaction` is plain old data, for which all-zero bytes are a
    // valid value (`SIG_DFL`, an empty mask, no flags, no restorer).
    unsafe { std::mem::zeroed() }
}

/// `sigaction(sig, new, old)`.
fn sigaction(
    sig: libc::c_int,
    new: Option<&libc::sigaction>,
    old: Option<&mut libc::sigaction>,
) -> std::io::Result<()> {
    let new = new.map_or(std::ptr::null(), |n| n as *const libc::sigaction);
    let old = old.map_or(std::ptr::null_mut(), |o| o as *mut libc::sigaction);
    // SAFETY: both pointers are null or point to live, initialised structures;
    // a handler installed through here is `handle` or `handle_segv`, which
    // keep the rules in the module docs.
    match unsafe { libc::sigaction(sig, new, old) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

fn install_once() -> std::io::Result<()> {
    take_over(libc::SIGBUS, handle, libc::SA_SIGINFO | libc::SA_RESTART, &PREVIOUS)
}

/// An `SA_SIGINFO` handler.
type Action = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// Installs `handler` for `sig` with `flags`, keeping the action it replaces
/// in `previous` (stored before ours can run, never written again).
fn take_over(
    sig: libc::c_int,
    handler: Action,
    flags: libc::c_int,
    previous: &OnceLock<libc::sigaction>,
) -> std::io::Result<()> {
    let mut old = empty_action();
    sigaction(sig, None, Some(&mut old))?;
    let _ = previous.set(old);
    let mut new = empty_action();
    new.sa_sigaction = handler as usize;
    new.sa_flags = flags;
    sigaction(sig, Some(&new), None)
}

extern "C" fn handle(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // The interrupted code's `errno` is kept: the hook's system calls and
    // futex waits may set it.
    let errno = errno_get();
    dispatch(sig, info, ctx);
    errno_set(errno);
}

/// This thread's `errno`.
fn errno_ptr() -> *mut libc::c_int {
    // SAFETY: `__errno_location` has no preconditions; it returns the
    // address of this thread's `errno`, valid for the thread's life.
    unsafe { libc::__errno_location() }
}

fn errno_get() -> libc::c_int {
    let p = errno_ptr();
    // SAFETY: `p` is this thread's live `errno`.
    unsafe { p.read() }
}

fn errno_set(value: libc::c_int) {
    let p = errno_ptr();
    // SAFETY: as in `errno_get`.
    unsafe { p.write(value) };
}

fn dispatch(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid `siginfo_t` to an `SA_SIGINFO` handler.
    let info_ref = unsafe { &*info };
    let code = info_ref.si_code;
    // SAFETY: for SIGBUS the kernel fills in `si_addr`.
    let addr = unsafe { info_ref.si_addr() } as usize;
    let hook = HOOK.load(Ordering::Acquire);
    if code == libc::BUS_ADRERR && hook != 0 {
        let (write, present) = error_code(ctx);
        let fault = BusFault { addr: VirtAddr::new(addr), write, present };
        // SAFETY: `HOOK` only ever holds a `Hook` stored by `install`.
        let hook: Hook = unsafe { std::mem::transmute::<usize, Hook>(hook) };
        if hook(&fault) == Verdict::Retry {
            return;
        }
    }
    if super::bytes::fixup(ctx) {
        return;
    }
    chain(PREVIOUS.get(), sig, info, ctx);
}

/// Hands the signal to the handler installed before ours (`prev`), or
/// (none, or the default) restores the default action and raises the signal
/// again, which is delivered as the handler returns: the process dies of it,
/// with its core, as without hmm (even if the instruction would not fault
/// again).
fn chain(
    prev: Option<&libc::sigaction>,
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    if let Some(prev) = prev {
        let h = prev.sa_sigaction;
        if h != libc::SIG_DFL && h != libc::SIG_IGN {
            if prev.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: a handler installed with `SA_SIGINFO` has this type.
                let f = unsafe { std::mem::transmute::<usize, Action>(h) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a handler installed without `SA_SIGINFO` has this type.
                let f = unsafe { std::mem::transmute::<usize, extern "C" fn(libc::c_int)>(h) };
                f(sig);
            }
            return;
        }
    }
    let _ = sigaction(sig, Some(&empty_action()), None);
    // SAFETY: `raise` is async-signal-safe; the signal is blocked in this
    // handler, so it stays pending until the handler returns.
    unsafe { libc::raise(sig) };
}

/// The page-fault error code's write and present bits (x86-64 reports them
/// in the signal context for a fault's `SIGBUS`).
#[cfg(target_arch = "x86_64")]
fn error_code(ctx: *mut libc::c_void) -> (Option<bool>, Option<bool>) {
    if ctx.is_null() {
        return (None, None);
    }
    // SAFETY: an `SA_SIGINFO` handler's third argument is its `ucontext_t`.
    let err =
        unsafe { (*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_ERR as usize] };
    (Some(err & 2 != 0), Some(err & 1 != 0))
}

#[cfg(not(target_arch = "x86_64"))]
fn error_code(_ctx: *mut libc::c_void) -> (Option<bool>, Option<bool>) {
    (None, None)
}

/// Whether this architecture reports what a faulting access was (see
/// [`BusFault`]): SIGBUS mode needs it to tell a write-protect fault from a
/// missing page.
pub fn reports_access() -> bool {
    cfg!(target_arch = "x86_64")
}

/// Sleeps until `word` is no longer `expected`, a wake comes, or `limit`
/// passes (`FUTEX_WAIT`, private). Async-signal-safe.
pub fn futex_wait(word: &AtomicU32, expected: u32, limit: Option<Duration>) {
    let ts = limit.map(|d| rustix::thread::futex::Timespec {
        tv_sec: d.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: d.subsec_nanos().into(),
    });
    let _ = rustix::thread::futex::wait(
        word,
        rustix::thread::futex::Flags::PRIVATE,
        expected,
        ts.as_ref(),
    );
}

/// Wakes every thread waiting on `word` (`FUTEX_WAKE`, private).
pub fn futex_wake(word: &AtomicU32) {
    let _ = rustix::thread::futex::wake(word, rustix::thread::futex::Flags::PRIVATE, u32::MAX);
}

/// This process's id, asked of the kernel each time (a forked child's
/// handler must not take its parent's instances for its own).
pub fn current_pid() -> u32 {
    rustix::process::getpid().as_raw_nonzero().get() as u32
}

/// Sleeps for `d` (`nanosleep`, async-signal-safe).
pub fn nap(d: Duration) {
    let ts = rustix::time::Timespec {
        tv_sec: d.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: d.subsec_nanos().into(),
    };
    let _ = rustix::thread::nanosleep(&ts);
}

/// Gives the CPU to another thread (`sched_yield`, async-signal-safe).
pub fn yield_now() {
    rustix::thread::sched_yield();
}
