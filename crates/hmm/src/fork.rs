//! Fork: the child reads, at every address, the data the parent had at fork
//! time, including pages that lived in device-private memory.
//!
//! # Mechanism
//!
//! The kernel copies the page table at fork. Pages in system memory follow by
//! its copy-on-write; a page on a device has no entry to copy, so the child
//! would read zeros there. With `UFFD_FEATURE_EVENT_FORK`, the child's copies
//! of the managed ranges stay registered, with a new descriptor the FORK event
//! hands to the fault service. The service gives it to a copier thread
//! ([`start_copy`]), which copies every device-resident page into the child
//! with the device's DMA engine (`UFFDIO_COPY` through the child's descriptor
//! reads the source in this process and installs in the child; a large copy
//! is split between threads, one a CPU), then closes the descriptor: the
//! child's ranges become plain memory of its own, and the child never
//! depends on its parent again.
//!
//! While it copies, the device pages are held as a migration holds them (a CPU
//! touch in the parent waits, migrations skip them as busy, a discard or an
//! unmap is remembered and honoured after), and a `Fork` invalidation is in
//! progress over every managed range, so devices drop their entries (pages
//! held exclusively are handed back) and cannot map anything again until the
//! child has its copy: nothing a device writes for the parent after the fork
//! reaches the child. Pages caught mid-migration at the fork are copied once
//! their migration has settled, from wherever it left them.
//!
//! # When `fork()` returns
//!
//! The C library's fork handlers (registered once, [`register`]) make the
//! parent's `fork()` return only after the child has every page: so a parent
//! that exits (or is killed) right after `fork()` leaves a complete child.
//! The child, for its part, waits in its handler until the parent's copy is
//! over (end of file on a pipe the parent closes then, or by dying), so none
//! of its own code runs against a half-copied address space. (Both go on
//! once the child has every page, before its descriptor is closed: see
//! [`start_copy`].)
//! They also keep the fork away from two hazards:
//!
//! - **Allocator locks.** `fork()` holds the C library's allocator locks
//!   while the kernel waits for its FORK event to be read. The fault service
//!   allocates while it handles messages, so before the fork it is parked in a
//!   mode that only reads messages into room reserved beforehand (they are
//!   handled after the fork).
//! - **Inherited descriptors.** A second fork while a copy is under way would
//!   hand the new child the first child's descriptor, keeping the first
//!   child's ranges registered with no one serving them. Forks wait for
//!   copies in progress, and one fork is prepared at a time.
//!
//! A fork made without the C library (a raw `clone`) skips the handlers: the
//! copy still happens, but `fork()` does not wait for it, and a parent that
//! dies first leaves zeros in the child where its device pages were.

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Once, Weak};

use crate::addr::PageRange;
use crate::devmem::DeviceMemory;
use crate::dma::{DmaError, SystemSink, ToSystem};
use crate::mirror::InvalidationEvent;
use crate::os::uffd::Uffd;
use crate::page::{DevicePage, PageEntry, Residency};
use crate::state::{FORK_WAIT, Inner, Range};

type Registry = Vec<Weak<Inner>>;

/// Every live instance, for the fork handlers.
static INSTANCES: Mutex<Registry> = Mutex::new(Vec::new());

thread_local! {
    /// Between `prepare` and `parent`/`child`: the registry, locked (so no
    /// instance comes or goes across the fork, and the child's copy of the
    /// lock is not left held by a thread it does not have), and the
    /// instances prepared.
    static HELD: RefCell<Option<Prepared>> = const { RefCell::new(None) };
}

/// What `prepare` hands to `parent` and `child`.
struct Prepared {
    registry: MutexGuard<'static, Registry>,
    /// The list of in-thread instances, held across `fork()` (see
    /// `state::IN_THREAD`).
    in_thread: Option<std::sync::RwLockWriteGuard<'static, Vec<Arc<Inner>>>>,
    live: Vec<Arc<Inner>>,
    /// The child waits for end of file on it before running on: the parent
    /// closes its end once the child has its pages (or by dying).
    ready: Option<(std::io::PipeReader, std::io::PipeWriter)>,
}

fn lock_registry() -> MutexGuard<'static, Registry> {
    INSTANCES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Adds an instance to those the fork handlers prepare (installing the
/// handlers the first time).
pub(crate) fn register(inner: &Arc<Inner>) {
    install_handlers();
    let mut r = lock_registry();
    r.retain(|w| w.strong_count() > 0);
    r.push(Arc::downgrade(inner));
}

/// Installs the fork handlers (once): for instances with `EVENT_FORK`
/// ([`register`]), and for the list of in-thread instances.
pub(crate) fn install_handlers() {
    static HANDLERS: Once = Once::new();
    HANDLERS.call_once(|| {
        if let Err(e) = crate::os::process::at_fork(prepare, parent, child) {
            tracing::warn!(error = %e, "cannot install fork handlers: fork() will not wait for device pages to reach the child");
        }
    });
}

/// The last step of `prepare`: the list of in-thread instances, taken to
/// write once nothing else of the fork needs a fault served.
fn take_in_thread_list() -> std::sync::RwLockWriteGuard<'static, Vec<Arc<Inner>>> {
    let g = crate::state::IN_THREAD.write().unwrap_or_else(|e| e.into_inner());
    crate::state::FORKING.with(|f| f.set(true));
    g
}

extern "C" fn prepare() {
    let reg = lock_registry();
    let live: Vec<Arc<Inner>> = reg.iter().filter_map(Weak::upgrade).collect();
    for inner in &live {
        if !inner.fork_copies.wait_idle(FORK_WAIT) {
            tracing::error!("a copy to an earlier child is still running; forking anyway");
        }
        inner.fork_installs.open();
        // Coherent memory the CPU maps would be shared with the child: it
        // goes back to system memory first (this needs the fault service).
        inner.coherent_before_fork();
        // The service parks only once no forward is in progress: it serves
        // on until then, since a forward waits for it to handle what it has
        // read (see `Service::may_park`), and it starts no forward parked.
        // Pages on their way to an address the application moved them to
        // would miss the child: they are in neither place it copies from.
        inner.fork_gate.asked.store(true, Ordering::SeqCst);
        inner.notifier.notify();
        if !inner.fork_gate.wait_parked(FORK_WAIT) {
            tracing::error!("the fault service did not park for the fork; forking anyway");
        }
        if !inner.forwards.is_idle() {
            tracing::error!("remapped pages are still on their way; forking anyway");
        }
    }
    let ready = if live.is_empty() { None } else { std::io::pipe().ok() };
    let in_thread = Some(take_in_thread_list());
    HELD.with(|h| *h.borrow_mut() = Some(Prepared { registry: reg, in_thread, live, ready }));
}

extern "C" fn parent() {
    let Some(Prepared { registry: reg, in_thread, live, ready }) =
        HELD.with(|h| h.borrow_mut().take())
    else {
        return;
    };
    crate::state::FORKING.with(|f| f.set(false));
    drop(in_thread);
    for inner in &live {
        inner.fork_gate.asked.store(false, Ordering::SeqCst);
        inner.coherent_after_fork();
        inner.notifier.notify();
    }
    for inner in &live {
        // The FORK event is handled (its copy begun), then the copy ends.
        inner.settle_events();
        // In SIGBUS mode the child's descriptor has the mode too: a child
        // touching an empty page before the close would get a signal that
        // no instance of its own serves. It runs once the close is done.
        let copies = match inner.sigbus_mode() {
            false => &inner.fork_copying,
            true => &inner.fork_copies,
        };
        if !copies.wait_idle(FORK_WAIT) {
            tracing::error!(
                "the copy of device pages to the child is still running after {FORK_WAIT:?}"
            );
        }
        // (Nothing to note any more; the copier took what it needed.)
        inner.fork_installs.close();
    }
    // The child runs on.
    drop(ready);
    drop(live);
    drop(reg);
}

extern "C" fn child() {
    let Some(Prepared { registry: mut reg, in_thread, live, ready }) =
        HELD.with(|h| h.borrow_mut().take())
    else {
        return;
    };
    crate::state::FORKING.with(|f| f.set(false));
    drop(in_thread);
    // The parent's instances have no threads here: none is the child's.
    // Their state is the parent's; it is left alone (never dropped here).
    for inner in &live {
        inner.coherent_after_fork();
    }
    std::mem::forget(live);
    reg.clear();
    drop(reg);
    // Nothing of the child runs before its pages are all in place: an mremap
    // or munmap of its own could otherwise race the parent's copy.
    if let Some((mut reader, writer)) = ready {
        drop(writer);
        let mut b = [0u8; 1];
        loop {
            match std::io::Read::read(&mut reader, &mut b) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
}

/// Starts the copy of the parent's device pages into the child behind
/// `child` (called by the fault service on a FORK event).
///
/// Two counts follow it: `fork_copying` ends once the child has every page,
/// which is all the parent's `fork()` waits for (the child then runs on);
/// `fork_copies` ends once the child's descriptor is closed too, which a
/// next fork waits for (it must not inherit the descriptor). Closing it
/// takes the kernel a walk over the child's registered page tables (about
/// 20 ms a GiB): a child that faults meanwhile waits for the close, and then
/// finds its ranges plain memory.
pub(crate) fn start_copy(inner: &Arc<Inner>, child: Uffd) {
    inner.fork_copies.begin();
    inner.fork_copying.begin();
    let me = inner.clone();
    let spawned = std::thread::Builder::new().name("hmm-fork".into()).spawn(move || {
        let child = Arc::new(child);
        copy_to_child(&me, &child);
        me.fork_copying.end();
        child.close();
        me.fork_copies.end();
    });
    if let Err(e) = spawned {
        inner.fork_copying.end();
        inner.fork_copies.end();
        tracing::error!(error = %e, "cannot start the copy to a forked child: it reads zeros where device pages were");
    }
}

/// A device page held for the copy: its range, index and page.
struct Held {
    range: Arc<Range>,
    index: usize,
    page: DevicePage,
}

impl Held {
    /// Holds page `index` of `range` (whose entry is `e`, locked by the
    /// caller) if it lives on a device and no migration holds it.
    fn take(range: &Arc<Range>, index: usize, e: &mut PageEntry) -> Option<Held> {
        let Residency::Device(page) = e.residency() else { return None };
        e.begin_migration().ok()?;
        Some(Held { range: range.clone(), index, page })
    }
}

/// Copies every device-resident page of every managed range into the child
/// (see the module docs); the caller closes the child's descriptor.
fn copy_to_child(inner: &Arc<Inner>, child: &Arc<Uffd>) {
    let ranges: Vec<Arc<Range>> = {
        let r = inner.ranges.read().unwrap_or_else(|e| e.into_inner());
        r.values().cloned().collect()
    };
    // Devices drop their entries and map nothing until the copy is done.
    let _invalidating: Vec<_> =
        ranges.iter().map(|r| inner.notifiers.start(r.range(), InvalidationEvent::Fork)).collect();
    let sink = Arc::new(SystemSink::copy_only(child.clone()));
    let mut busy: Vec<(Arc<Range>, usize)> = Vec::new();
    let mut held = Vec::new();
    for r in &ranges {
        let mut t = r.lock();
        let all = 0..t.len();
        // Blank runs hold nothing to copy: a step per node, not per page.
        t.update(
            all,
            |e| e,
            |i, e| {
                if e.is_migrating() {
                    busy.push((r.clone(), i));
                } else {
                    held.extend(Held::take(r, i, e));
                }
            },
        );
    }
    // Pages put back after the fork began, and committed before the look
    // above: copied from this process, if in system memory and not held.
    // (A page copied held, as a device page, is on its device again; one
    // busy above that is copied here too meets its copy in the child.)
    let mut late = inner.fork_installs.close();
    late.sort();
    late.dedup();
    copy_held(inner, child, &sink, held);
    for a in late {
        let Some(r) = inner.find(a) else { continue };
        let i = r.index(a);
        let in_system = {
            let e = r.lock()[i];
            !e.is_migrating() && e.residency() == Residency::System
        };
        if in_system {
            copy_from_parent(child, &r, i);
        }
    }
    // Pages a migration held at the fork: copied from where it left them.
    for (r, i) in busy {
        r.wait_settled(i..i + 1, FORK_WAIT);
        let (again, in_system) = {
            let mut t = r.lock();
            let e = &mut t[i];
            (Held::take(&r, i, e), e.residency() == Residency::System)
        };
        if let Some(h) = again {
            copy_held(inner, child, &sink, vec![h]);
        } else if in_system {
            copy_from_parent(child, &r, i);
        }
    }
    inner.counters.forks.fetch_add(1, Ordering::Relaxed);
}

/// Copies `part` (held pages of `mem`) into the child. A copy that finds no
/// memory for the child's page (the child's memory cgroup at its limit, say)
/// is tried again a few times, further apart each time, for up to about a
/// quarter second in all: a page given up on is lost to the child.
fn copy_retrying(
    mem: &DeviceMemory,
    sink: &Arc<SystemSink>,
    part: &[Held],
) -> Vec<Result<(), DmaError>> {
    let copies: Vec<ToSystem> =
        part.iter().map(|h| ToSystem { src: h.page, dst: h.range.page_addr(h.index) }).collect();
    crate::dma::copy_to_system_retrying(mem.ops().dma(), sink, &copies, |round| round < 8)
}

/// Held pages per thread, at least, when a copy is split between threads.
const PARALLEL_PAGES: usize = 4096;

/// [`copy_retrying`], with the pages split between as many threads as the
/// machine has CPUs (four at most), each submitting its share to the engine:
/// the child waits for the whole copy, and one thread's copies, each
/// allocating the child's page and installing it, leave the other CPUs idle.
/// (An engine may be called from any thread; one that has worker threads of
/// its own splits each share again.)
fn copy_parallel(
    mem: &DeviceMemory,
    sink: &Arc<SystemSink>,
    part: &[Held],
) -> Vec<Result<(), DmaError>> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
    let threads = cpus.min(part.len() / PARALLEL_PAGES).max(1);
    if threads == 1 {
        return copy_retrying(mem, sink, part);
    }
    let per = part.len().div_ceil(threads);
    std::thread::scope(|s| {
        let shares: Vec<_> = part
            .chunks(per)
            .skip(1)
            .map(|share| {
                let spawned = std::thread::Builder::new()
                    .name("hmm-fork-copy".into())
                    .spawn_scoped(s, move || copy_retrying(mem, sink, share));
                (share, spawned)
            })
            .collect();
        let mut out = copy_retrying(mem, sink, &part[..per]);
        for (share, h) in shares {
            // A thread that cannot start, or panicked, leaves its share to
            // this one.
            match h.ok().map(|h| h.join()) {
                Some(Ok(r)) => out.extend(r),
                _ => out.extend(copy_retrying(mem, sink, share)),
            }
        }
        out
    })
}

/// Copies page `i` of `r` from this process's memory into the child (a
/// touch of it, if it is absent by now, is served as any fault). A page the
/// child has already is left as it is.
fn copy_from_parent(child: &Uffd, r: &Range, i: usize) {
    let dst = PageRange::from_pages(r.page_addr(i), 1).expect("one page");
    if let Err(e) = child.copy_from(dst, r.mapping(), dst, false)
        && e.kind != crate::os::uffd::FillErrorKind::Exists
    {
        tracing::warn!(addr = %dst.start(), error = %e, "cannot copy a page to the forked child");
    }
}

/// Copies the held device pages into the child (a device at a time, with its
/// own engine), then gives them back.
fn copy_held(inner: &Arc<Inner>, child: &Uffd, sink: &Arc<SystemSink>, mut held: Vec<Held>) {
    held.sort_by_key(|h| (h.page.dev, h.range.page_addr(h.index)));
    let mut rest = &held[..];
    while let Some(first) = rest.first() {
        let n = rest.iter().take_while(|h| h.page.dev == first.page.dev).count();
        let (part, tail) = rest.split_at(n);
        rest = tail;
        let results = match inner.device(first.page.dev) {
            Some(mem) if !mem.is_failed() => copy_parallel(&mem, sink, part),
            _ => vec![Err(DmaError::Failed("the device failed".into())); n],
        };
        for (h, r) in part.iter().zip(results) {
            match r {
                Ok(()) => {
                    inner.counters.fork_pages.fetch_add(1, Ordering::Relaxed);
                }
                // The child has the page already (copied by an earlier pass of
                // this copy, as `copy_from_parent` finds too): left as it is.
                Err(DmaError::Exists) => {}
                Err(e) => {
                    // What lived on a failed device is lost to the child too.
                    let page =
                        PageRange::from_pages(h.range.page_addr(h.index), 1).expect("one page");
                    tracing::warn!(addr = %page.start(), error = %e, "a device page did not reach the forked child");
                    let _ = child.poison(page, true);
                }
            }
        }
    }
    // Give the pages back; a page discarded or unmapped meanwhile is freed.
    let mut put = Vec::new();
    let mut touched: Vec<Arc<Range>> = Vec::new();
    for h in &held {
        let kept = {
            let mut t = h.range.lock();
            if t[h.index].is_moved() {
                None
            } else {
                Some(t[h.index].abort().expect("a held page aborts"))
            }
        };
        match kept {
            // The parent moved it (`mremap`) meanwhile: its data goes on to
            // the new address, and the hold with it.
            None => {
                let src = crate::state::Source::Device(h.page);
                inner.forwards.hand_over(inner, &h.range, h.index, src);
            }
            Some(false) => put.push(h.page),
            Some(true) => {}
        }
        if !touched.iter().any(|r| Arc::ptr_eq(r, &h.range)) {
            touched.push(h.range.clone());
        }
    }
    inner.put_pages(&put);
    for r in touched {
        r.settled.notify_all();
        let _ = inner.uffd.wake(r.range());
    }
}

/// Coherent memory across a fork (see `crate::coherent`): the CPU mappings of
/// device pages would be shared with the child, so they go back first.
impl Inner {
    /// Before a fork: no new coherent page is mapped for the CPU, and every
    /// one that is goes back to system memory (see the module docs).
    pub(crate) fn coherent_before_fork(self: &std::sync::Arc<Self>) {
        self.coherent_forking.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.coherent_maps.load(Ordering::SeqCst) > 0 {
            if std::time::Instant::now() >= deadline {
                tracing::error!("coherent memory still being mapped at fork");
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let devs: Vec<std::sync::Arc<DeviceMemory>> = {
            let d = self.devices.read().unwrap_or_else(|e| e.into_inner());
            d.iter()
                .flatten()
                .filter(|m| m.kind() == crate::devmem::MemoryKind::Coherent && !m.is_released())
                .cloned()
                .collect()
        };
        for mem in devs {
            let mapped: Vec<crate::page::DevicePage> = mem
                .resident_pages()
                .into_iter()
                .filter(|(_, a)| {
                    self.find(*a).is_some_and(|r| r.lock()[r.index(*a)].is_cpu_mapped())
                })
                .map(|(p, _)| p)
                .collect();
            if let Err(e) = self.evict(mem.id(), &mapped) {
                tracing::error!(device = %mem.id(), error = %e, "coherent pages stay mapped across a fork");
            }
        }
    }

    /// After a fork (in the parent and in the child).
    pub(crate) fn coherent_after_fork(&self) {
        self.coherent_forking.store(false, Ordering::SeqCst);
    }
}
