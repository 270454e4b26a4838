//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::io::Read;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Barrier, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use hmm::os::uffd::{Uffd, UffdEvent};

/// Returns `true` (after printing why) when this machine cannot run userfaultfd
/// tests: the test then ends early.
pub fn skip_without_uffd() -> bool {
    match hmm::probe::probe().usable() {
        Ok(()) => false,
        Err((reason, fix)) => {
            eprintln!("SKIP: userfaultfd unusable here: {reason} (fix: {fix})");
            true
        }
    }
}

/// Returns `true` (after printing why) when the probe lacks `feature`.
pub fn skip_without(feature: &str) -> bool {
    if skip_without_uffd() {
        return true;
    }
    if hmm::probe::probe().has(feature) {
        false
    } else {
        eprintln!("SKIP: this kernel lacks {feature}");
        true
    }
}

/// How long a forked child of a test may run before it is killed and its
/// outcome is `ChildOutcome::TimedOut`: children read or write a few
/// megabytes, which takes well under a second even on a loaded machine.
pub const CHILD_LIMIT: Duration = Duration::from_secs(60);

static FORK_LOCK: Mutex<()> = Mutex::new(());

/// Held by every test that forks or enables `EVENT_FORK`: a fork blocks until
/// every descriptor with `EVENT_FORK` that covers a copied range has its FORK
/// event read, so such tests must not overlap. Also held by tests that count
/// the pages a migration moves: after a fork every anonymous page of the
/// process is shared with the child until it exits, and a shared page cannot
/// be moved (`SkipReason::Busy`).
pub fn fork_lock() -> MutexGuard<'static, ()> {
    FORK_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `op` while another thread reads events from `uffd`, until `want` events
/// have arrived and `op` has returned, or 10 seconds pass; `on_event` sees each
/// as it arrives. An `op` still running after 10 s (a fault nobody served, an
/// unmap whose event was not read) is released by closing `uffd`, and the test
/// goes on to fail on what it got, instead of hanging.
///
/// The reading loop allocates nothing (its vectors are sized up front, before
/// `op` may start): while a fork waits for its FORK event to be read, glibc
/// holds the malloc locks.
pub fn with_reader<T: Send>(
    uffd: &Uffd,
    want: usize,
    mut on_event: impl FnMut(&UffdEvent) + Send,
    op: impl FnOnce() -> T + Send,
) -> (T, Vec<UffdEvent>) {
    let ready = Barrier::new(2);
    let done = std::sync::atomic::AtomicBool::new(false);
    thread::scope(|s| {
        let (ready, done) = (&ready, &done);
        let reader = s.spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut got = Vec::with_capacity(want + 16);
            let mut batch = Vec::with_capacity(16);
            // Only now may `op` fork: this thread has done its allocating.
            ready.wait();
            let finished = |got: &Vec<UffdEvent>| {
                got.len() >= want && done.load(std::sync::atomic::Ordering::Acquire)
            };
            while !finished(&got) && Instant::now() < deadline {
                if uffd.poll(Some(Duration::from_millis(50))).expect("poll") {
                    uffd.read_events(&mut batch, 16).expect("read events");
                    for ev in &batch {
                        on_event(ev);
                    }
                    got.append(&mut batch);
                }
            }
            if !done.load(std::sync::atomic::Ordering::Acquire) {
                eprintln!(
                    "with_reader: the operation still ran after 10 s; closing the descriptor"
                );
                uffd.close();
            }
            got
        });
        ready.wait();
        let out = op();
        done.store(true, std::sync::atomic::Ordering::Release);
        (out, reader.join().expect("reader thread"))
    })
}

/// Waits (up to 5 s) for the fault service to have handled an event.
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

static HUGETLB_LOCK: Mutex<()> = Mutex::new(());

/// hugetlb pages reserved for one test: released (the pool put back to its
/// size before) when dropped. Tests holding one do not overlap.
pub struct HugetlbPages {
    before: u64,
    _lock: MutexGuard<'static, ()>,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

fn read_count(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Makes `n` 2 MiB hugetlb pages free, growing the pool if needed (as root);
/// `None`, after printing why, when the machine cannot.
pub fn reserve_hugetlb(n: u64) -> Option<HugetlbPages> {
    let lock = HUGETLB_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let free_path = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
    let before = read_count(NR_HUGEPAGES)?;
    let free = read_count(free_path).unwrap_or(0);
    if free < n {
        let _ = std::fs::write(NR_HUGEPAGES, (before + n - free).to_string());
    }
    let pages = HugetlbPages { before, _lock: lock };
    if read_count(free_path).unwrap_or(0) < n {
        eprintln!("SKIP: {n} hugetlb pages cannot be had here (not root, or no memory for them)");
        return None;
    }
    Some(pages)
}

impl Drop for HugetlbPages {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.before.to_string());
    }
}

/// A small deterministic generator (xorshift) for test data and random
/// operation sequences; the same seed gives the same numbers.
pub struct Rng(pub u64);

impl Rng {
    /// The next number.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Page `i` of `r` gets the word `i + salt` repeated.
pub fn fill_salted(r: &hmm::ManagedRange, salt: u64) {
    let page = hmm::PAGE_SIZE;
    let bytes: Vec<u8> = (0..r.pages() as u64)
        .flat_map(|i| std::iter::repeat_n((i + salt).to_ne_bytes(), page / 8).flatten())
        .collect();
    r.write(0, &bytes).unwrap();
}

/// Asserts that `bytes`, pages from `first_page` on, hold what
/// [`fill_salted`] wrote there; `who` names the reader in the message.
pub fn check_salted(bytes: &[u8], first_page: usize, salt: u64, who: &str) {
    for (k, page) in bytes.chunks(hmm::PAGE_SIZE).enumerate() {
        let want = ((first_page + k) as u64 + salt).to_ne_bytes();
        assert!(
            page.chunks(8).all(|w| w == want),
            "{who}: page {} holds the wrong data",
            first_page + k
        );
    }
}

/// What the CPU reads from the whole of `r`.
pub fn cpu_bytes(r: &hmm::ManagedRange) -> Vec<u8> {
    let mut b = vec![0u8; r.len()];
    r.read(0, &mut b).unwrap();
    b
}

/// Why [`PipeBytes::next_within`] has no byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipeEnd {
    /// Every write end is closed (the writer exited) and nothing is left.
    Closed,
    /// Nothing came within the time given.
    TimedOut(Duration),
}

/// The bytes a child process writes to a pipe, read with a deadline: a
/// thread reads the pipe (a plain `read` has no deadline) and hands each
/// byte over. The thread ends when every write end is closed, as when the
/// child exits or is killed.
pub struct PipeBytes {
    bytes: Receiver<u8>,
}

impl PipeBytes {
    pub fn new(mut pipe: std::io::PipeReader) -> Self {
        let (tx, bytes) = channel();
        thread::spawn(move || {
            let mut b = [0u8];
            while pipe.read_exact(&mut b).is_ok() && tx.send(b[0]).is_ok() {}
        });
        Self { bytes }
    }

    /// The next byte, waiting at most `limit` for it.
    pub fn next_within(&self, limit: Duration) -> Result<u8, PipeEnd> {
        self.bytes.recv_timeout(limit).map_err(|e| match e {
            RecvTimeoutError::Timeout => PipeEnd::TimedOut(limit),
            RecvTimeoutError::Disconnected => PipeEnd::Closed,
        })
    }
}

/// Runs `cmd` to its end, as `Command::output` does, but for at most
/// `limit`: a command still running then is killed, and the test fails
/// saying which command hung and what it had printed.
pub fn output_within(cmd: &mut std::process::Command, limit: Duration) -> std::process::Output {
    use std::process::Stdio;
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut v = Vec::new();
            let _ = pipe.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped")));
    let err = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the command") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let printed = |h: thread::JoinHandle<Vec<u8>>| {
                String::from_utf8_lossy(&h.join().unwrap_or_default()).into_owned()
            };
            panic!(
                "{what} still ran after {limit:?} and was killed; it printed:\n{}\n{}",
                printed(out),
                printed(err)
            );
        }
        thread::sleep(Duration::from_millis(5));
    };
    let stdout = out.join().expect("stdout reader");
    let stderr = err.join().expect("stderr reader");
    std::process::Output { status, stdout, stderr }
}

/// Sets its flag when dropped, however the thread holding it ends (a
/// failed assertion included): threads that loop until the flag is set
/// stop then, and a scope joining them does not hang.
pub struct StopOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Waits (up to 30 s) until `count` reaches `at_least`: lets threads that
/// run beside a test's main work get their turns on a loaded machine
/// before the work stops them.
pub fn wait_for_count(what: &str, count: &std::sync::atomic::AtomicU64, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while count.load(std::sync::atomic::Ordering::Relaxed) < at_least {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {} of {at_least}",
            count.load(std::sync::atomic::Ordering::Relaxed)
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// The index of the first page of `got` that differs from `want`.
pub fn first_wrong_page(got: &[u8], want: &[u8]) -> Option<usize> {
    let page = hmm::PAGE_SIZE;
    got.chunks(page).zip(want.chunks(page)).position(|(a, b)| a != b)
}

/// The fault modes this machine can run (in-thread needs userfaultfd's
/// SIGBUS mode; its absence is printed).
pub fn fault_modes() -> Vec<hmm::FaultMode> {
    let mut m = vec![hmm::FaultMode::Service];
    if hmm::probe::probe().has("sigbus-mode") {
        m.push(hmm::FaultMode::InThread);
    } else {
        eprintln!("SKIP (in-thread mode): this kernel has no userfaultfd SIGBUS mode");
    }
    m
}

/// An instance in fault mode `mode`, otherwise configured by default.
pub fn instance(mode: hmm::FaultMode) -> hmm::Hmm {
    hmm::Hmm::with_config(hmm::HmmConfig { fault_mode: mode, ..hmm::HmmConfig::default() })
        .expect("an hmm instance")
}

/// For a forked child's closure: reads all of `r` and compares it with
/// `want`. 0 when equal, 2 when the read failed, 10 + the first wrong page.
pub fn child_reads_back(r: &hmm::ManagedRange, want: &[u8]) -> i32 {
    let mut got = vec![0u8; r.len()];
    if r.mapping().read(0, &mut got).is_err() {
        return 2;
    }
    match first_wrong_page(&got, want) {
        Some(p) => 10 + p as i32,
        None => 0,
    }
}
