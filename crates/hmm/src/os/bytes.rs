//! Bulk copies and fills of memory other threads (and the kernel) may touch
//! at the same time.
//!
//! hmm's memory is shared: an application thread may write a page while a
//! DMA worker copies it, and the kernel may fill or empty it under both.
//! Rust gives plain (non-atomic) accesses that race no meaning, so
//! [`Mapping`](super::mm::Mapping) reaches shared bytes only through these
//! routines, which keep the compiler out of the question:
//!
//! - on x86-64, the string instructions (`rep movsb`, `rep stosb`) in inline
//!   assembly. Assembly is opaque to the optimizer, and the hardware defines
//!   what a racing access does: every byte read is a byte some write stored
//!   (no tearing below a byte, no invented values). With the fast-string
//!   microcode of current CPUs (`ERMS`, `FSRM`), a page copied this way runs
//!   at `memcpy`'s speed;
//! - elsewhere, relaxed atomic accesses, a word at a time where aligned.
//!
//! Either way the copy is not atomic as a whole: a concurrent writer's bytes
//! may appear in part, exactly as they would to a device's DMA engine reading
//! the page while the CPU writes it.
//!
//! # Copies that fail instead of faulting
//!
//! [`copy_fallible`] copies between this thread's buffer and an address the
//! application owns, which it may unmap or protect at any moment: a device
//! reading or writing system memory through its page table, whose entry can
//! be stale for the moment an invalidation takes to arrive. A fault there
//! must fail the copy, not kill the process. The kernel does this for its
//! own `copy_from_user` with an exception table: the faulting instruction's
//! address is looked up, and the fault handler resumes at a fixup that
//! returns the bytes left. hmm does the same in user space: one `rep movsb`
//! in a routine of its own, and handlers for `SIGSEGV` and `SIGBUS`
//! ([`super::sigbus`]) that move a fault at exactly that instruction to the
//! routine's exit, with the count of bytes not copied in hand. Every other
//! signal goes where it went before. A fault the kernel resolves (a missing
//! page userfaultfd serves, copy-on-write, a swapped-out page) is resolved
//! as it would be for any CPU access, and the copy goes on.
//!
//! This runs at `memcpy`'s speed, where the kernel's checked copy
//! (`process_vm_readv`) costs a system call and a page-table walk per page;
//! on other architectures, and wherever the handlers cannot be installed,
//! [`super::vm::read_memory`] and [`Mapping::write_checked`](super::mm::Mapping::write_checked)
//! keep to the system calls.

#[cfg(not(target_arch = "x86_64"))]
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

/// Copies `len` bytes from `src` to `dst`.
///
/// # Safety
///
/// Both ranges must be valid for the access (mapped with the permission, or
/// backed by memory the kernel will fault in without a signal the caller is
/// not prepared for), and must not overlap. Other threads may access either
/// range meanwhile, atomically or through these routines.
pub(crate) unsafe fn copy(dst: *mut u8, src: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the caller's contract: `len` bytes at both pointers are
        // accessible and do not overlap. The direction flag is clear on every
        // entry to Rust code (the System V ABI), so the copy runs upwards;
        // the instruction touches no stack and no flags.
        unsafe {
            std::arch::asm!(
                "rep movsb",
                inout("rcx") len => _,
                inout("rdi") dst => _,
                inout("rsi") src => _,
                options(nostack, preserves_flags),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // Bytes up to the destination's word boundary, whole words where the
        // source is aligned alike, then the tail.
        let aligned = dst.align_offset(8) == src.align_offset(8);
        let head = if aligned { dst.align_offset(8).min(len) } else { len };
        let words = (len - head) / 8;
        for i in (0..head).chain(head + words * 8..len) {
            // SAFETY: inside both ranges (the caller's contract); shared bytes
            // are accessed atomically.
            let b = unsafe { AtomicU8::from_ptr(src.add(i).cast_mut()) }.load(Ordering::Relaxed);
            // SAFETY: as above.
            unsafe { AtomicU8::from_ptr(dst.add(i)) }.store(b, Ordering::Relaxed);
        }
        for w in 0..words {
            let at = head + w * 8;
            // SAFETY: as above, and 8-byte aligned (`head` reaches the boundary
            // of both pointers).
            let v = unsafe { AtomicU64::from_ptr(src.add(at).cast_mut().cast()) }
                .load(Ordering::Relaxed);
            // SAFETY: as above.
            unsafe { AtomicU64::from_ptr(dst.add(at).cast()) }.store(v, Ordering::Relaxed);
        }
    }
}

/// Sets `len` bytes at `dst` to `byte`.
///
/// # Safety
///
/// The range must be valid for writing (as for [`copy`]). Other threads may
/// access it meanwhile, atomically or through these routines.
pub(crate) unsafe fn fill(dst: *mut u8, byte: u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the caller's contract: `len` bytes at `dst` are writable.
        // The direction flag is clear (see `copy`).
        unsafe {
            std::arch::asm!(
                "rep stosb",
                inout("rcx") len => _,
                inout("rdi") dst => _,
                in("al") byte,
                options(nostack, preserves_flags),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let word = u64::from_ne_bytes([byte; 8]);
        let head = dst.align_offset(8).min(len);
        let words = (len - head) / 8;
        for i in (0..head).chain(head + words * 8..len) {
            // SAFETY: inside the range (the caller's contract), atomically.
            unsafe { AtomicU8::from_ptr(dst.add(i)) }.store(byte, Ordering::Relaxed);
        }
        for w in 0..words {
            // SAFETY: as above, and 8-byte aligned (`head` reaches the boundary).
            unsafe { AtomicU64::from_ptr(dst.add(head + w * 8).cast()) }
                .store(word, Ordering::Relaxed);
        }
    }
}

#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    // hmm_copy_fallible(dst: rdi, src: rsi, len: rdx) -> bytes not copied (rax).
    // A fault at `hmm_copy_fallible_insn` resumes at `hmm_copy_fallible_exit`
    // (see `fixup`): `rep movsb` stops with rcx holding the bytes left, as
    // the architecture guarantees for a fault between iterations.
    ".pushsection .text.hmm_copy_fallible,\"ax\",@progbits",
    ".p2align 4",
    ".globl hmm_copy_fallible",
    ".hidden hmm_copy_fallible",
    ".type hmm_copy_fallible,@function",
    "hmm_copy_fallible:",
    "mov rcx, rdx",
    ".globl hmm_copy_fallible_insn",
    ".hidden hmm_copy_fallible_insn",
    "hmm_copy_fallible_insn:",
    "rep movsb",
    ".globl hmm_copy_fallible_exit",
    ".hidden hmm_copy_fallible_exit",
    "hmm_copy_fallible_exit:",
    "mov rax, rcx",
    "ret",
    ".size hmm_copy_fallible, . - hmm_copy_fallible",
    ".popsection",
);

#[cfg(target_arch = "x86_64")]
unsafe extern "C" {
    fn hmm_copy_fallible(dst: *mut u8, src: *const u8, len: usize) -> usize;
    static hmm_copy_fallible_insn: u8;
    static hmm_copy_fallible_exit: u8;
}

/// Copies `len` bytes from `src` to `dst`, stopping at the first byte whose
/// access faults in a way the kernel does not resolve (unmapped, not
/// permitted, poisoned): returns the bytes copied, or `None` where copies
/// that fail cannot be made here (then nothing was copied; use the kernel's
/// checked copy).
///
/// # Safety
///
/// One of the two ranges must be valid for the access and private to the
/// caller (its own buffer); the other may be any address of this process
/// that no Rust reference covers. The ranges must not overlap.
pub(crate) unsafe fn copy_fallible(dst: *mut u8, src: *const u8, len: usize) -> Option<usize> {
    if len == 0 {
        return Some(0);
    }
    #[cfg(target_arch = "x86_64")]
    {
        if !super::sigbus::install_fixups() {
            return None;
        }
        // SAFETY: the routine copies `len` bytes upwards and returns what it
        // did not copy; a fault at its one instruction resumes at its exit
        // (the handlers are installed above). The caller's contract covers
        // the ranges.
        let left = unsafe { hmm_copy_fallible(dst, src, len) };
        Some(len - left)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dst, src);
        None
    }
}

/// Moves a fault at [`copy_fallible`]'s instruction to the routine's exit:
/// true if `ctx` (a signal handler's `ucontext_t`) was stopped there, and
/// now resumes at the exit. Async-signal-safe.
pub(super) fn fixup(ctx: *mut libc::c_void) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if ctx.is_null() {
            return false;
        }
        // SAFETY: an `SA_SIGINFO` handler's third argument is the interrupted
        // context, which the handler may change before it returns; nothing
        // else refers to it meanwhile.
        let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
        // Taking the address of a symbol reads nothing.
        let (insn, exit) = (
            &raw const hmm_copy_fallible_insn as usize,
            &raw const hmm_copy_fallible_exit as usize,
        );
        let rip = &mut uc.uc_mcontext.gregs[libc::REG_RIP as usize];
        if *rip as usize != insn {
            return false;
        }
        *rip = exit as i64;
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ctx;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held by the tests that fault inside a fallible copy or change the
    /// handlers: under `cargo test` they share a process, and a fault taken
    /// while the other test has another handler in place would never end.
    static HANDLERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn copies_every_length_and_alignment_exactly() {
        let src: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for from in 0..9 {
            for to in 0..9 {
                for len in [0, 1, 7, 8, 9, 63, 64, 65, 200] {
                    let mut dst = vec![0xEEu8; 300];
                    let (d, s) = (dst[to..].as_mut_ptr(), src[from..].as_ptr());
                    // SAFETY: both ranges lie inside their own vectors.
                    unsafe { copy(d, s, len) };
                    assert_eq!(&dst[to..to + len], &src[from..from + len], "{from} {to} {len}");
                    assert!(dst[..to].iter().all(|b| *b == 0xEE), "bytes before {to} kept");
                    assert!(dst[to + len..].iter().all(|b| *b == 0xEE), "bytes after kept");
                }
            }
        }
    }

    #[test]
    fn a_fallible_copy_stops_at_the_first_byte_it_cannot_reach() {
        use crate::os::mm::{Mapping, Protection};
        if !cfg!(target_arch = "x86_64") {
            return;
        }
        let _one = HANDLERS.lock().unwrap_or_else(|e| e.into_inner());
        let m = Mapping::anonymous(3 * 4096, Protection::ReadWrite).unwrap();
        m.fill(0, 3 * 4096, 0x5A).unwrap();
        let mid = m.range().subrange(4096, 4096).unwrap();
        m.protect(mid, Protection::None).unwrap();
        let base = m.range().start().get() as *const u8;
        let mut buf = vec![0u8; 3 * 4096];
        // From 100 bytes before the hole: those 100 bytes, then the fault.
        // SAFETY: `buf` is this test's own; the source is a live mapping.
        let n = unsafe { copy_fallible(buf.as_mut_ptr(), base.wrapping_add(4096 - 100), 2 * 4096) };
        assert_eq!(n, Some(100), "copied up to the protected page");
        assert!(buf[..100].iter().all(|b| *b == 0x5A));
        // Into the hole: nothing, and no signal reaches the test.
        let hole = base.wrapping_add(4096).cast_mut();
        let mark = [0xC3u8; 10];
        // SAFETY: as above, the other way round.
        let n = unsafe { copy_fallible(hole, mark.as_ptr(), 10) };
        assert_eq!(n, Some(0), "nothing written into a protected page");
        // Once accessible again, the same copies go through whole.
        m.protect(mid, Protection::ReadWrite).unwrap();
        // SAFETY: as above.
        let n = unsafe { copy_fallible(hole, mark.as_ptr(), 10) };
        assert_eq!(n, Some(10));
        // SAFETY: as above.
        let n = unsafe { copy_fallible(buf.as_mut_ptr(), base, 3 * 4096) };
        assert_eq!(n, Some(3 * 4096));
        assert_eq!(&buf[4096..4106], &mark, "the bytes written through the hole");
        assert!(buf[4106..].iter().all(|b| *b == 0x5A), "the rest as filled");
    }

    /// A handler installed over hmm's need not pass hmm's faults on: while
    /// one is in place, copies that could fault go through the kernel, and
    /// they come back once hmm's handler is.
    #[test]
    fn a_replaced_handler_sends_copies_through_the_kernel() {
        use crate::addr::VirtAddr;
        use crate::os::mm::{Mapping, Protection};
        if !cfg!(target_arch = "x86_64") {
            return;
        }
        extern "C" fn other(_: libc::c_int) {}
        let _one = HANDLERS.lock().unwrap_or_else(|e| e.into_inner());
        let m = Mapping::anonymous(2 * 4096, Protection::ReadWrite).unwrap();
        m.fill(0, 2 * 4096, 7).unwrap();
        m.protect(m.range().subrange(4096, 4096).unwrap(), Protection::None).unwrap();
        let mut buf = [0u8; 8192];
        // SAFETY: `buf` is this test's own; the source is a live mapping.
        let fast = unsafe { copy_fallible(buf.as_mut_ptr(), m.addr().get() as *const u8, 8192) };
        assert_eq!(fast, Some(4096), "hmm's handlers in place: the fast copy, cut short");
        // SAFETY: an all-zero `sigaction` is a valid value.
        let mut theirs: libc::sigaction = unsafe { std::mem::zeroed() };
        theirs.sa_sigaction = other as extern "C" fn(libc::c_int) as usize;
        // SAFETY: as above.
        let mut ours: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: both structures are live; the handler installed does
        // nothing, and no SIGSEGV is raised while it is in place.
        assert_eq!(unsafe { libc::sigaction(libc::SIGSEGV, &theirs, &mut ours) }, 0);
        // SAFETY: as above.
        let fast = unsafe { copy_fallible(buf.as_mut_ptr(), m.addr().get() as *const u8, 8192) };
        assert_eq!(fast, None, "another handler in place: no fast copy");
        let read = super::super::vm::read_memory(VirtAddr::new(m.addr().get()), &mut buf);
        assert_eq!(read, Ok(4096), "the kernel's copy, cut short at the same page");
        // SAFETY: puts hmm's handler back as it was.
        assert_eq!(unsafe { libc::sigaction(libc::SIGSEGV, &ours, std::ptr::null_mut()) }, 0);
        // SAFETY: as above.
        let fast = unsafe { copy_fallible(buf.as_mut_ptr(), m.addr().get() as *const u8, 8192) };
        assert_eq!(fast, Some(4096), "hmm's handler back: the fast copy again");
    }

    #[test]
    fn fills_exactly_the_range() {
        for at in 0..9 {
            for len in [0, 1, 8, 13, 100] {
                let mut v = [1u8; 128];
                let d = v[at..].as_mut_ptr();
                // SAFETY: inside the vector.
                unsafe { fill(d, 0xA5, len) };
                assert!(v[at..at + len].iter().all(|b| *b == 0xA5), "{at} {len}");
                assert!(v[..at].iter().chain(&v[at + len..]).all(|b| *b == 1), "{at} {len}");
            }
        }
    }
}
