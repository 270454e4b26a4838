//! A memory budget for tiers: a set of ranges kept within a number of bytes
//! of system memory, the coldest pages moved to a tier device (the compressed
//! or the remote one), as Google's far memory and Meta's TMO keep cold pages
//! in zswap.
//!
//! # The access signal
//!
//! This kernel offers no cheap read-access signal to a process: idle page
//! tracking (`CONFIG_IDLE_PAGE_TRACKING`) and soft-dirty bits are not built
//! in, `PAGEMAP_SCAN`'s written bit needs userfaultfd's asynchronous write
//! protection (which the synchronous one hmm uses for tracked writes rules
//! out), and DAMON's virtual-address monitoring is off. So the budget uses
//! hinting faults, as the kernel's NUMA balancing does: a page moved aside
//! faults when it is touched. Here the page moved aside is a page demoted to
//! the tier, and its fault is hmm's own fault-back (a promotion). Every scan
//! notes the pages that came back from the tier since the last one: those are
//! hot, and are demoted again only after every page not seen hot, and the
//! longest-ago hot first. A page's first demotion is its sample; a hot page
//! pays one fault-back, then stays. Pages the tier declines (they would not
//! compress) are left alone for a while.
//!
//! # What is reported
//!
//! The bytes of the set in system memory, the limit, pages demoted and
//! promoted, and the promotion rate over the last second (Google's far memory
//! holds it under an SLO: too high, and the budget costs the program time).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::addr::{PAGE_SIZE, PageRange, VirtAddr};
use crate::devmem::DeviceMemory;
use crate::driver::HmmHandle;
use crate::migrate::SkipReason;
use crate::observe::Place;

/// How a budget is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetConfig {
    /// The most bytes of the set in system memory.
    pub limit: usize,
    /// How often the set is looked at.
    pub interval: Duration,
    /// How many scans a page the tier declined is left alone.
    pub declined_scans: u64,
}

impl BudgetConfig {
    /// A budget of `limit` bytes, looked at every 20 ms.
    pub fn new(limit: usize) -> Self {
        Self { limit, interval: Duration::from_millis(20), declined_scans: 50 }
    }
}

/// Where a budget stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct BudgetStats {
    /// Bytes of the set in system memory at the last scan.
    pub resident: usize,
    /// The limit.
    pub limit: usize,
    /// Scans made.
    pub scans: u64,
    /// Pages moved to the tier.
    pub demoted: u64,
    /// Pages the tier declined (they stay in system memory).
    pub declined: u64,
    /// Pages that came back from the tier (a touch faulted them back).
    pub promoted: u64,
    /// Promotions per second over the last second.
    pub promotion_rate: f64,
}

#[derive(Debug, Clone, Copy, Default)]
struct PageState {
    /// The scan that last saw the page come back from the tier (0: never).
    hot: u64,
    /// Whether the page was on the tier at the last scan.
    on_tier: bool,
    /// Left alone until this scan (the tier declined it).
    skip_until: u64,
}

struct Shared {
    hmm: HmmHandle,
    policy: Arc<dyn super::Policy>,
    tier: Arc<DeviceMemory>,
    set: Vec<PageRange>,
    config: BudgetConfig,
    stop: AtomicBool,
    wake: (Mutex<()>, Condvar),
    stats: Mutex<BudgetStats>,
    scanned: Condvar,
    demoted: AtomicU64,
}

/// A budget being kept (see the [module docs](self)); dropping it stops
/// keeping it (pages on the tier stay there until touched or moved).
pub struct Budget {
    shared: Arc<Shared>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget").field("config", &self.shared.config).finish()
    }
}

impl Budget {
    pub(crate) fn start(
        hmm: HmmHandle,
        set: Vec<PageRange>,
        tier: Arc<DeviceMemory>,
        config: BudgetConfig,
        policy: Arc<dyn super::Policy>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            hmm,
            policy,
            tier,
            set,
            config,
            stop: AtomicBool::new(false),
            wake: (Mutex::new(()), Condvar::new()),
            stats: Mutex::new(BudgetStats { limit: config.limit, ..Default::default() }),
            scanned: Condvar::new(),
            demoted: AtomicU64::new(0),
        });
        let s = shared.clone();
        let worker =
            std::thread::Builder::new().name("hmm-budget".into()).spawn(move || keep(&s))?;
        Ok(Self { shared, worker: Some(worker) })
    }

    /// Where it stands.
    pub fn stats(&self) -> BudgetStats {
        *self.shared.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `limit` for a scan after this call to end; returns its
    /// figures, or `None` if none ended in time.
    pub fn next_scan(&self, limit: Duration) -> Option<BudgetStats> {
        let deadline = Instant::now() + limit;
        let mut st = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        // The scan under way may have read the set before the call.
        let want = st.scans + 2;
        while st.scans < want {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            st = self.shared.scanned.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        Some(*st)
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.1.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn keep(s: &Shared) {
    let mut pages: HashMap<usize, PageState> = HashMap::new();
    let mut scan = 0u64;
    let mut promotions: std::collections::VecDeque<(Instant, u64)> = Default::default();
    while !s.stop.load(Ordering::Acquire) && !s.hmm.is_shut_down() {
        scan += 1;
        let now = Instant::now();
        let (resident, promoted, declined) = scan_once(s, &mut pages, scan);
        promotions.push_back((now, promoted));
        while promotions
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(1))
        {
            promotions.pop_front();
        }
        let window = promotions.front().map_or(Duration::ZERO, |(t, _)| now.duration_since(*t));
        let recent: u64 = promotions.iter().map(|(_, n)| n).sum();
        {
            let mut st = s.stats.lock().unwrap_or_else(|e| e.into_inner());
            st.resident = resident;
            st.scans = scan;
            st.promoted += promoted;
            st.declined += declined;
            st.demoted = s.demoted.load(Ordering::Relaxed);
            st.promotion_rate = recent as f64 / window.max(s.config.interval).as_secs_f64();
        }
        s.scanned.notify_all();
        let g = s.wake.0.lock().unwrap_or_else(|e| e.into_inner());
        if s.stop.load(Ordering::Acquire) {
            break;
        }
        let _ = s.wake.1.wait_timeout(g, s.config.interval);
    }
}

/// One look at the set: notes promotions, demotes the coldest pages beyond
/// the limit. Returns the bytes left in system memory after the demotions,
/// the promotions seen and the pages declined.
fn scan_once(s: &Shared, pages: &mut HashMap<usize, PageState>, scan: u64) -> (usize, u64, u64) {
    let tier = Place::Device(s.tier.id());
    let mut system: Vec<usize> = Vec::new();
    let mut promoted = 0;
    for range in &s.set {
        for (run, place) in s.hmm.residency_map(*range).runs() {
            for k in 0..run.pages() {
                let addr = run.start().get() + k * PAGE_SIZE;
                let p = pages.entry(addr).or_default();
                if place == Place::System {
                    if p.on_tier {
                        p.hot = scan;
                        promoted += 1;
                    }
                    system.push(addr);
                }
                p.on_tier = place == tier;
            }
        }
    }
    let resident = system.len() * PAGE_SIZE;
    let over = resident.saturating_sub(s.config.limit).div_ceil(PAGE_SIZE);
    if over == 0 {
        return (resident, promoted, 0);
    }
    // In the policy's order (by default: never seen hot first, then the
    // longest ago; by address within each).
    let mut candidates: Vec<super::Demotion> = system
        .into_iter()
        .filter(|a| pages[a].skip_until <= scan)
        .map(|a| super::Demotion { addr: VirtAddr::new(a), hot_scan: pages[&a].hot })
        .collect();
    s.policy.demotion_order(&mut candidates);
    let mut victims: Vec<usize> = candidates.iter().take(over).map(|c| c.addr.get()).collect();
    victims.sort_unstable();
    let mut declined = 0;
    let mut moved = 0;
    let mut i = 0;
    while i < victims.len() {
        let mut j = i + 1;
        while j < victims.len() && victims[j] == victims[j - 1] + PAGE_SIZE {
            j += 1;
        }
        let run = PageRange::from_pages(VirtAddr::new(victims[i]), j - i).expect("a run");
        // Demoted in pieces that stay inside one range of the set.
        for part in s.set.iter().filter_map(|r| intersect(*r, run)) {
            let mut span = crate::trace::span("placement: demote", crate::trace::Category::Policy);
            match s.hmm.migrate_to_device(part, &s.tier, s.tier.ops().dma()) {
                Ok(report) => {
                    if let Some(sp) = &mut span {
                        sp.arg("addr", part.start().get() as u64);
                        sp.arg("pages", report.migrated as u64);
                    }
                    moved += report.migrated;
                    s.demoted.fetch_add(report.migrated as u64, Ordering::Relaxed);
                    for (a, why) in &report.skipped {
                        if let Some(p) = pages.get_mut(&a.get()) {
                            if matches!(why, SkipReason::Declined(_)) {
                                declined += 1;
                            }
                            p.skip_until = scan + s.config.declined_scans;
                        }
                    }
                    for k in 0..part.pages() {
                        let a = part.start().get() + k * PAGE_SIZE;
                        if let Some(p) = pages.get_mut(&a)
                            && p.skip_until <= scan
                        {
                            p.on_tier = true;
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(part = %part, error = %e, "budget: a demotion failed");
                }
            }
        }
        i = j;
    }
    (resident - moved * PAGE_SIZE, promoted, declined)
}

fn intersect(a: PageRange, b: PageRange) -> Option<PageRange> {
    let s = a.start().max(b.start());
    let e = a.end().min(b.end());
    (s < e).then(|| PageRange::new(s, e.get() - s.get()).expect("page-aligned"))
}
