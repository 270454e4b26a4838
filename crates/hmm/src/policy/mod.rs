//! Placement policy: what NVIDIA's UVM and AMD's SVM decide in their
//! drivers, once for every device, as a layer above the mechanism (which
//! moves a page only when asked and stays policy-free).
//!
//! A [`Placement`] is made over an [`Hmm`] instance. It keeps:
//!
//! - **range attributes** ([`Advice`], [`Placement::advise`]): preferred
//!   location, accessed-by devices, read-mostly, granularity; and a query
//!   ([`Placement::attributes`]) that returns them with the residency, as
//!   `cudaMemRangeGetAttribute` does;
//! - **device-fault decisions** ([`Placement::device_fault`], which a driver
//!   calls before it fills its page table): each page that misses is
//!   migrated to the device, mapped where it is, or duplicated (read-mostly
//!   pages: the device keeps a copy, and a write drops every copy first), as
//!   the [`Policy`] decides; a migration grows by density prefetch within
//!   the page's block ([`density`]);
//! - **asynchronous prefetch** ([`Placement::prefetch`]): a handle to wait
//!   on, poll or cancel, with the pages done and refused, and why;
//! - **thrashing detection and mitigation** ([`ThrashConfig`]): a page that
//!   keeps moving is throttled, then pinned where it is and mapped remotely;
//! - **counters** of every decision ([`PlacementStats`]), each also traced
//!   (category `policy`) while tracing is on.
//!
//! A researcher plugs in a policy of their own by implementing [`Policy`]
//! (what a device fault does, what it prefetches, what a full device evicts
//! to make room, what a budget demotes first); [`DefaultPolicy`] is the
//! built-in one.
//!
//! # Locks
//!
//! The attribute map and the thrashing histories each have their own lock,
//! held only to read or update them: never across a migration or a
//! callback of the policy. The prefetch worker holds nothing while it
//! migrates.

pub mod attrs;
pub mod budget;
pub mod density;
pub mod prefetch;
pub mod thrash;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

pub use attrs::{Advice, Attributes, Location};
pub use budget::{Budget, BudgetConfig, BudgetStats};
pub use density::{Block, DEFAULT_THRESHOLD};
pub use prefetch::{Prefetch, PrefetchProgress};
pub use thrash::{ThrashConfig, ThrashVerdict};

use crate::addr::{PAGE_SIZE, PageRange, VirtAddr};
use crate::devmem::{DeviceMemory, MemoryKind};
use crate::driver::HmmHandle;
use crate::migrate::{MigrationReport, SkipReason};
use crate::observe::Place;
use crate::page::{DeviceId, DevicePage};
use crate::space::{Hmm, HmmError};
use crate::trace::{Category, span};
use attrs::AttributeMap;
use prefetch::PrefetchState;
use thrash::Thrash;

/// Why a placement call was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The advice cannot be kept as given.
    #[error("bad advice: {0}")]
    BadAdvice(String),
    /// The location names a device this instance does not have.
    #[error("device {0} is not registered with this hmm instance")]
    UnknownDevice(DeviceId),
    /// The placement's instance is shut down, or its worker is gone.
    #[error("the placement is shut down")]
    ShutDown,
    /// The mechanism refused.
    #[error(transparent)]
    Hmm(#[from] HmmError),
}

/// What a device does about a page it touched that is not in its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Bring the page into the device's memory.
    Migrate,
    /// Map the page where it is (the device reaches it remotely).
    Map,
    /// For a read: leave the page where it is and let the device keep a
    /// copy of its own (read duplication). The CPU's page is write-protected
    /// first, so any write, from any side, drops the copies before it lands.
    /// A driver that keeps no copies maps the page instead.
    Duplicate,
}

/// A device's fault on one page, as a [`Policy`] sees it.
#[derive(Debug)]
pub struct FaultContext<'a> {
    /// The device that faulted.
    pub device: DeviceId,
    /// Its memory's kind.
    pub kind: MemoryKind,
    /// The page.
    pub page: VirtAddr,
    /// Whether the access writes.
    pub write: bool,
    /// Where the page lives now.
    pub place: Place,
    /// The range's attributes at the page.
    pub attributes: &'a Attributes,
    /// Whether thrashing mitigation has pinned the page where it is.
    pub pinned: bool,
}

/// A block in which a device fault's migration may grow, as a [`Policy`]
/// sees it.
#[derive(Debug)]
pub struct BlockContext<'a> {
    /// The device that faulted.
    pub device: DeviceId,
    /// The block (the range's granularity, aligned).
    pub range: PageRange,
    /// Which pages are already on the device, and which faulted.
    pub pages: &'a Block,
}

/// The decisions a placement policy makes. Every method has the built-in
/// behaviour as its default, so a policy overrides only what it changes.
/// Called without any of hmm's locks held; may block briefly, must not
/// call back into the [`Placement`].
pub trait Policy: Send + Sync {
    /// A name for reports.
    fn name(&self) -> &str {
        "default"
    }

    /// Migrate the page, or map it where it is (see [`DefaultPolicy`]).
    fn on_device_fault(&self, fault: &FaultContext<'_>) -> Decision {
        default_decision(fault)
    }

    /// The pages of a block to bring to the device with a fault's pages:
    /// a mask over the block, faulted pages included (see [`density`]).
    fn prefetch(&self, block: &BlockContext<'_>) -> Vec<bool> {
        block.pages.expand(DEFAULT_THRESHOLD)
    }

    /// Up to `want` pages of `device` to evict so that a device fault's
    /// migration finds room: by default the least recently used (the
    /// region's stamps, refreshed by the device's accesses). Pages listed
    /// that back no address, or that a migration holds, are skipped.
    fn eviction_victims(&self, device: &DeviceMemory, want: usize) -> Vec<DevicePage> {
        device.coldest(want)
    }

    /// Orders a memory budget's candidates for demotion, first to go first:
    /// by default pages never seen hot, then the longest ago seen hot, by
    /// address within each (see [`budget`]).
    fn demotion_order(&self, candidates: &mut [Demotion]) {
        candidates.sort_by_key(|c| (c.hot_scan, c.addr));
    }
}

/// A page a memory budget may demote, as a [`Policy`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demotion {
    /// The page.
    pub addr: VirtAddr,
    /// The budget's scan that last saw the page come back from the tier (a
    /// touch promoted it); 0 if never.
    pub hot_scan: u64,
}

/// The built-in decision (UVM's and AMD SVM's defaults): a page pinned by
/// thrashing mitigation is mapped; a read of a read-mostly page by a
/// private-memory device is duplicated; a page whose range prefers another
/// location, or that the device is set to access where it is (accessed-by),
/// is mapped, and so is any page of a device whose memory the CPU can
/// address (coherent memory maps system pages as they are). Otherwise a
/// private-memory device migrates the page to itself on its first touch
/// (a write to a read-mostly page included: that collapses the copies).
pub fn default_decision(f: &FaultContext<'_>) -> Decision {
    let a = f.attributes;
    if f.pinned {
        return Decision::Map;
    }
    if a.read_mostly && !f.write && f.kind == MemoryKind::Private {
        return Decision::Duplicate;
    }
    if a.keeps_away_from(f.device) || f.kind == MemoryKind::Coherent {
        return Decision::Map;
    }
    Decision::Migrate
}

/// The built-in policy, with a density threshold of its own.
#[derive(Debug, Clone, Copy)]
pub struct DefaultPolicy {
    /// Percent of a subregion that must be there or faulting for a fault to
    /// grow to it (UVM: 51).
    pub density_threshold: u8,
}

impl Default for DefaultPolicy {
    fn default() -> Self {
        Self { density_threshold: DEFAULT_THRESHOLD }
    }
}

impl Policy for DefaultPolicy {
    fn prefetch(&self, block: &BlockContext<'_>) -> Vec<bool> {
        block.pages.expand(self.density_threshold)
    }
}

/// A policy that never prefetches: demand faults alone (for comparison).
#[derive(Debug, Clone, Copy, Default)]
pub struct DemandOnly;

impl Policy for DemandOnly {
    fn name(&self) -> &str {
        "demand"
    }

    fn prefetch(&self, block: &BlockContext<'_>) -> Vec<bool> {
        let mut mask = block.pages.expand(100);
        // Only the faulted pages themselves.
        for (i, m) in mask.iter_mut().enumerate() {
            *m = *m && block.pages.is_faulted(i);
        }
        mask
    }
}

/// How a [`Placement`] is set up.
#[derive(Clone)]
pub struct PlacementConfig {
    /// The policy that decides.
    pub policy: Arc<dyn Policy>,
    /// Thrashing detection's thresholds; `None` turns it off.
    pub thrash: Option<ThrashConfig>,
    /// Pages a prefetch moves per step (its progress and cancel points).
    pub prefetch_chunk_pages: usize,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            policy: Arc::new(DefaultPolicy::default()),
            thrash: Some(ThrashConfig::default()),
            prefetch_chunk_pages: 512,
        }
    }
}

impl std::fmt::Debug for PlacementConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlacementConfig")
            .field("policy", &self.policy.name())
            .field("thrash", &self.thrash)
            .field("prefetch_chunk_pages", &self.prefetch_chunk_pages)
            .finish()
    }
}

/// Every decision a placement made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PlacementStats {
    /// Device faults decided ([`Placement::device_fault`] calls).
    pub device_faults: u64,
    /// Faulted pages the policy migrated to the faulting device.
    pub fault_pages_migrated: u64,
    /// Faulted pages the policy left where they are, for the device to map.
    pub fault_pages_mapped: u64,
    /// Faulted pages the policy had the device copy (read duplication).
    pub fault_pages_duplicated: u64,
    /// Pages migrated along with faulted ones (density prefetch).
    pub pages_prefetched: u64,
    /// Device pages the policy chose to evict to make room for a fault.
    pub pages_evicted: u64,
    /// Prefetches asked for ([`Placement::prefetch`]).
    pub prefetches: u64,
    /// Pages those prefetches moved.
    pub prefetch_pages_moved: u64,
    /// Moves of a page found thrashing.
    pub thrash_detected: u64,
    /// Of those, moves held back by a nap.
    pub throttles: u64,
    /// Pages pinned where they are.
    pub pins: u64,
    /// Moves a pin turned into a remote mapping.
    pub pinned_maps: u64,
}

#[derive(Default)]
struct Counters {
    device_faults: AtomicU64,
    fault_pages_migrated: AtomicU64,
    fault_pages_mapped: AtomicU64,
    fault_pages_duplicated: AtomicU64,
    pages_prefetched: AtomicU64,
    pages_evicted: AtomicU64,
    prefetches: AtomicU64,
    prefetch_pages_moved: AtomicU64,
    thrash_detected: AtomicU64,
    throttles: AtomicU64,
    pins: AtomicU64,
    pinned_maps: AtomicU64,
}

fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Ordering::Relaxed);
}

/// What [`Placement::device_fault`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultOutcome {
    /// Faulted pages migrated to the device.
    pub migrated: usize,
    /// Pages migrated along with them (density prefetch).
    pub prefetched: usize,
    /// Faulted pages left where they are for the device to map.
    pub mapped: usize,
    /// Faulted pages left where they are for the device to copy (read
    /// duplication), in address order.
    pub duplicate: Vec<VirtAddr>,
    /// How long the fault waited for thrashing mitigation.
    pub throttled: Duration,
    /// Pages the migrations refused, with the reason (the device maps
    /// those where they are).
    pub refused: Vec<(VirtAddr, SkipReason)>,
}

/// One run of a range with its attributes and where its pages live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeAttributes {
    /// The run.
    pub range: PageRange,
    /// Its attributes.
    pub attributes: Attributes,
    /// Its pages by place.
    pub residency: BTreeMap<Place, usize>,
}

struct Shared {
    hmm: HmmHandle,
    config: PlacementConfig,
    attrs: RwLock<AttributeMap>,
    thrash: Option<Thrash>,
    counters: Counters,
    queue: Mutex<VecDeque<Arc<PrefetchState>>>,
    queued: Condvar,
    stop: AtomicBool,
}

/// The placement layer over one instance (see the [module docs](self)).
/// Dropping it cancels the prefetches not yet done and stops its worker.
pub struct Placement {
    shared: Arc<Shared>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placement").field("config", &self.shared.config).finish()
    }
}

impl Placement {
    /// A placement over `hmm` with the built-in policy.
    pub fn new(hmm: &Hmm) -> Result<Self, PolicyError> {
        Self::with_config(hmm, PlacementConfig::default())
    }

    /// A placement over `hmm` set up as `config` says.
    pub fn with_config(hmm: &Hmm, config: PlacementConfig) -> Result<Self, PolicyError> {
        if config.prefetch_chunk_pages == 0 {
            return Err(PolicyError::BadAdvice(
                "prefetch_chunk_pages is 0: give at least 1 page".into(),
            ));
        }
        let shared = Arc::new(Shared {
            hmm: hmm.handle(),
            thrash: config.thrash.map(Thrash::new),
            config,
            attrs: RwLock::default(),
            counters: Counters::default(),
            queue: Mutex::default(),
            queued: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("hmm-placement".into())
            .spawn(move || run_prefetches(&s))
            .map_err(HmmError::Thread)?;
        Ok(Self { shared, worker: Some(worker) })
    }

    /// The policy in use.
    pub fn policy(&self) -> &Arc<dyn Policy> {
        &self.shared.config.policy
    }

    /// Gives `advice` over `range` (any range: advice over memory hmm does
    /// not manage is kept, and applies once it is managed).
    pub fn advise(&self, range: PageRange, advice: Advice) -> Result<(), PolicyError> {
        attrs::check(advice).map_err(PolicyError::BadAdvice)?;
        let device = match advice {
            Advice::PreferredLocation(Location::Device(d))
            | Advice::AccessedBy(d)
            | Advice::UnsetAccessedBy(d) => Some(d),
            _ => None,
        };
        if let Some(d) = device
            && self.shared.hmm.device_memory(d).is_none()
        {
            return Err(PolicyError::UnknownDevice(d));
        }
        self.shared.attrs.write().unwrap_or_else(|e| e.into_inner()).apply(range, advice);
        Ok(())
    }

    /// The attributes of `range`, run by run, with where each run's pages
    /// live now.
    pub fn attributes(&self, range: PageRange) -> Vec<RangeAttributes> {
        let runs = self.shared.attrs.read().unwrap_or_else(|e| e.into_inner()).get(range);
        runs.into_iter()
            .map(|(range, attributes)| RangeAttributes {
                range,
                residency: self.shared.hmm.residency_map(range).counts(),
                attributes,
            })
            .collect()
    }

    /// Starts moving `range` to `to` on the placement's worker, a chunk at
    /// a time; the handle shows its progress. Pages already there count as
    /// done; pages a migration refuses are counted by reason.
    pub fn prefetch(&self, range: PageRange, to: Location) -> Result<Prefetch, PolicyError> {
        if let Location::Device(d) = to
            && self.shared.hmm.device_memory(d).is_none()
        {
            return Err(PolicyError::UnknownDevice(d));
        }
        if self.shared.hmm.is_shut_down() || self.shared.stop.load(Ordering::Acquire) {
            return Err(PolicyError::ShutDown);
        }
        let state = PrefetchState::new(range, to);
        add(&self.shared.counters.prefetches, 1);
        self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()).push_back(state.clone());
        self.shared.queued.notify_all();
        Ok(Prefetch { state })
    }

    /// A device's fault on `range` (a driver calls it before it fills its
    /// page table): each page not in `mem` is migrated there or left where
    /// it is, as the policy decides; migrations grow by the policy's
    /// prefetch within each page's block. Thrashing pages are throttled (the
    /// call sleeps a nap) or, once pinned, left where they are. A migration
    /// that fails or refuses pages does not fail the fault: the device maps
    /// those pages where they are (refusals are listed in the outcome).
    pub fn device_fault(
        &self,
        mem: &Arc<DeviceMemory>,
        range: PageRange,
        write: bool,
    ) -> FaultOutcome {
        let s = &self.shared;
        let mut span = span("placement: device fault", Category::Policy);
        add(&s.counters.device_faults, 1);
        let dev = mem.id();
        let here = Place::Device(dev);
        let map = s.hmm.residency_map(range);
        let attrs = s.attrs.read().unwrap_or_else(|e| e.into_inner()).get(range);
        let now = Instant::now();
        let mut out = FaultOutcome::default();
        // Pages to migrate, by block start, with the block's granularity.
        let mut blocks: BTreeMap<usize, (usize, Vec<usize>)> = BTreeMap::new();
        let mut nap = Duration::ZERO;
        for (run, place) in map.runs() {
            if place == here
                || !matches!(place, Place::System | Place::Unpopulated | Place::Device(_))
            {
                continue;
            }
            for k in 0..run.pages() {
                let page = VirtAddr::new(run.start().get() + k * PAGE_SIZE);
                let a = attrs_at(&attrs, page);
                let pinned = s.thrash.as_ref().is_some_and(|t| t.is_pinned(page.get(), now));
                let f = FaultContext {
                    device: dev,
                    kind: mem.kind(),
                    page,
                    write,
                    place,
                    attributes: &a,
                    pinned,
                };
                let mut decision = s.config.policy.on_device_fault(&f);
                // Data that moves again may be thrashing (a page never
                // populated has nothing to move).
                if decision == Decision::Migrate
                    && place != Place::Unpopulated
                    && let Some(t) = &s.thrash
                {
                    let (verdict, ev) = t.on_move(page.get(), now);
                    self.count_thrash(ev);
                    match verdict {
                        ThrashVerdict::Move => {}
                        ThrashVerdict::Throttle(d) => nap = nap.max(d),
                        ThrashVerdict::Pinned => {
                            add(&s.counters.pinned_maps, 1);
                            decision = Decision::Map;
                        }
                    }
                }
                match decision {
                    Decision::Map => out.mapped += 1,
                    Decision::Duplicate => out.duplicate.push(page),
                    Decision::Migrate => {
                        let g = a.granularity;
                        let start = page.get() & !(g - 1);
                        blocks.entry(start).or_insert_with(|| (g, Vec::new())).1.push(page.get());
                    }
                }
            }
        }
        if !nap.is_zero() {
            std::thread::sleep(nap);
            out.throttled = nap;
        }
        let need: usize = blocks.values().map(|(_, f)| f.len()).sum();
        self.make_room(mem, need);
        for (start, (g, faulted)) in blocks {
            self.migrate_block(mem, start, g, &faulted, &mut out);
        }
        add(&s.counters.fault_pages_mapped, out.mapped);
        add(&s.counters.fault_pages_duplicated, out.duplicate.len());
        add(&s.counters.fault_pages_migrated, out.migrated);
        add(&s.counters.pages_prefetched, out.prefetched);
        if let Some(sp) = &mut span {
            sp.arg("addr", range.start().get() as u64);
            sp.arg("migrated", out.migrated as u64);
            sp.arg("prefetched", out.prefetched as u64);
            sp.arg("mapped", out.mapped as u64);
        }
        out
    }

    /// Migrates a block's faulted pages to `mem`, grown by the policy's
    /// prefetch to pages hmm manages that neither advice nor thrashing
    /// mitigation keeps where they are.
    fn migrate_block(
        &self,
        mem: &Arc<DeviceMemory>,
        start: usize,
        granularity: usize,
        faulted: &[usize],
        out: &mut FaultOutcome,
    ) {
        let s = &self.shared;
        let n = granularity / PAGE_SIZE;
        let block_range = PageRange::new(VirtAddr::new(start), granularity).expect("aligned");
        let places = s.hmm.residency_map(block_range);
        let attrs = s.attrs.read().unwrap_or_else(|e| e.into_inner()).get(block_range);
        let mut block = Block::new(n);
        let mut movable = vec![false; n];
        let now = Instant::now();
        for (run, place) in places.runs() {
            let first = (run.start().get() - start) / PAGE_SIZE;
            for (i, m) in movable.iter_mut().enumerate().skip(first).take(run.pages()) {
                if place == Place::Device(mem.id()) {
                    block.set_resident(i);
                }
                let page = start + i * PAGE_SIZE;
                // What advice keeps where it is stays, as a fault on it would.
                let kept = attrs_at(&attrs, VirtAddr::new(page)).keeps_away_from(mem.id());
                *m = matches!(place, Place::System | Place::Unpopulated | Place::Device(_))
                    && !kept
                    && !s.thrash.as_ref().is_some_and(|t| t.is_pinned(page, now));
            }
        }
        for p in faulted {
            block.set_faulted((p - start) / PAGE_SIZE);
        }
        let ctx = BlockContext { device: mem.id(), range: block_range, pages: &block };
        let mut mask = s.config.policy.prefetch(&ctx);
        mask.resize(n, false);
        for (i, m) in mask.iter_mut().enumerate() {
            // Faulted pages always; others only where they can move.
            *m = block.is_faulted(i) || (*m && movable[i] && !block.is_resident(i));
        }
        trim_to_free(&mut mask, &block, mem.free_pages() as usize);
        let mut i = 0;
        while i < n {
            if !mask[i] {
                i += 1;
                continue;
            }
            let j = (i..n).find(|&j| !mask[j]).unwrap_or(n);
            let run =
                PageRange::from_pages(VirtAddr::new(start + i * PAGE_SIZE), j - i).expect("inside");
            let faulted_here = (i..j).filter(|&k| block.is_faulted(k)).count();
            match s.hmm.migrate_here(run, mem) {
                Ok(report) => {
                    let refused_faulted = report
                        .skipped
                        .iter()
                        .filter(|(a, _)| block.is_faulted((a.get() - start) / PAGE_SIZE))
                        .count();
                    let moved_faulted = faulted_here - refused_faulted;
                    out.migrated += moved_faulted;
                    out.prefetched += report.migrated.saturating_sub(moved_faulted);
                    out.mapped += refused_faulted;
                    out.refused.extend(report.skipped);
                }
                Err(e) => {
                    tracing::debug!(run = %run, error = %e, "placement: a device fault's migration failed");
                    out.mapped += faulted_here;
                }
            }
            i = j;
        }
    }

    /// Evicts the policy's victims when `mem` has fewer free pages than the
    /// `need` faulted pages about to move in. (A device whose pressure is
    /// `Evict` would evict its coldest anyway: this lets the policy choose
    /// first, and makes room on a device that refuses all the same.)
    fn make_room(&self, mem: &Arc<DeviceMemory>, need: usize) {
        let free = mem.free_pages() as usize;
        if need <= free {
            return;
        }
        let s = &self.shared;
        let mut victims = s.config.policy.eviction_victims(mem, need - free);
        victims.retain(|p| p.dev == mem.id() && mem.backs(*p).is_some());
        victims.truncate(need - free);
        if victims.is_empty() {
            return;
        }
        let mut span = span("placement: evict", Category::Policy);
        match s.hmm.evict(mem, &victims) {
            Ok(n) => {
                add(&s.counters.pages_evicted, n);
                if let Some(sp) = &mut span {
                    sp.arg("pages", n as u64);
                }
            }
            Err(e) => tracing::debug!(error = %e, "placement: an eviction failed"),
        }
    }

    fn count_thrash(&self, ev: thrash::ThrashEvents) {
        let c = &self.shared.counters;
        if ev.detected {
            add(&c.thrash_detected, 1);
            let _s = span("placement: thrashing", Category::Policy);
        }
        if ev.throttled {
            add(&c.throttles, 1);
        }
        if ev.pinned {
            add(&c.pins, 1);
            let _s = span("placement: pin", Category::Policy);
        }
    }

    /// Keeps the pages of `set` within `config.limit` bytes of system
    /// memory from now on, moving the coldest to `tier` (a device of this
    /// instance, typically a compressed or remote tier); see [`budget`].
    /// The budget lasts as long as the returned handle.
    pub fn set_budget(
        &self,
        set: &[PageRange],
        tier: &Arc<DeviceMemory>,
        config: BudgetConfig,
    ) -> Result<Budget, PolicyError> {
        if set.is_empty() {
            return Err(PolicyError::BadAdvice(
                "a budget over no memory: give the ranges it keeps".into(),
            ));
        }
        if config.interval.is_zero() {
            return Err(PolicyError::BadAdvice(
                "a budget looked at every 0 s: give an interval (20 ms is the default)".into(),
            ));
        }
        match self.shared.hmm.device_memory(tier.id()) {
            Some(m) if Arc::ptr_eq(&m, tier) => {}
            _ => return Err(PolicyError::UnknownDevice(tier.id())),
        }
        let policy = self.shared.config.policy.clone();
        Budget::start(self.shared.hmm.clone(), set.to_vec(), tier.clone(), config, policy)
            .map_err(|e| PolicyError::Hmm(HmmError::Thread(e)))
    }

    /// Every decision so far.
    pub fn stats(&self) -> PlacementStats {
        let c = &self.shared.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PlacementStats {
            device_faults: g(&c.device_faults),
            fault_pages_migrated: g(&c.fault_pages_migrated),
            fault_pages_mapped: g(&c.fault_pages_mapped),
            fault_pages_duplicated: g(&c.fault_pages_duplicated),
            pages_prefetched: g(&c.pages_prefetched),
            pages_evicted: g(&c.pages_evicted),
            prefetches: g(&c.prefetches),
            prefetch_pages_moved: g(&c.prefetch_pages_moved),
            thrash_detected: g(&c.thrash_detected),
            throttles: g(&c.throttles),
            pins: g(&c.pins),
            pinned_maps: g(&c.pinned_maps),
        }
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for p in self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            p.cancel.store(true, Ordering::Release);
        }
        self.shared.queued.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Prefetch fills free device memory only, never evicts: a full device
/// would otherwise evict pages still in use to make room for pages that may
/// never be, and a random pattern on an oversubscribed device would feed
/// itself (each fault's prefetch evicting what the next fault wants back).
/// The faulted pages keep their place (they may evict, as a demand fault
/// does); of the rest, those nearest a faulted page are kept, as many as
/// the free pages left over allow.
fn trim_to_free(mask: &mut [bool], block: &Block, free: usize) {
    let faulted: Vec<usize> = (0..mask.len()).filter(|&i| block.is_faulted(i)).collect();
    let mut extra: Vec<usize> =
        (0..mask.len()).filter(|&i| mask[i] && !block.is_faulted(i)).collect();
    let room = free.saturating_sub(faulted.len());
    if extra.len() <= room {
        return;
    }
    let distance = |i: usize| faulted.iter().map(|&f| i.abs_diff(f)).min().unwrap_or(usize::MAX);
    // Nearest first; at equal distance, the page after a faulted one (a
    // stream goes up).
    extra.sort_by_key(|&i| (distance(i), faulted.iter().all(|&f| i < f)));
    for &i in &extra[room..] {
        mask[i] = false;
    }
}

fn attrs_at(runs: &[(PageRange, Attributes)], page: VirtAddr) -> Attributes {
    runs.iter().find(|(r, _)| r.contains(page)).map(|(_, a)| a.clone()).unwrap_or_default()
}

/// The worker: runs the queued prefetches in order until the placement
/// goes (those left are ended cancelled).
fn run_prefetches(s: &Shared) {
    loop {
        let job = {
            let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(j) = q.pop_front() {
                    break Some(j);
                }
                if s.stop.load(Ordering::Acquire) {
                    break None;
                }
                q = s.queued.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let Some(job) = job else { return };
        run_prefetch(s, &job);
    }
}

fn run_prefetch(s: &Shared, job: &PrefetchState) {
    let mut span = span("placement: prefetch", Category::Policy);
    let chunk = s.config.prefetch_chunk_pages;
    let mut off = 0;
    while off < job.range.pages() {
        if job.cancel.load(Ordering::Acquire) {
            break;
        }
        let n = chunk.min(job.range.pages() - off);
        let part =
            PageRange::from_pages(VirtAddr::new(job.range.start().get() + off * PAGE_SIZE), n)
                .expect("inside the range");
        match move_chunk(s, part, job.to) {
            Ok(report) => {
                add(&s.counters.prefetch_pages_moved, report.migrated);
                job.count(n, report.migrated, &report.skipped);
            }
            Err(e) => {
                job.finish(Some(e.to_string()));
                return;
            }
        }
        off += n;
    }
    if let Some(sp) = &mut span {
        sp.arg("addr", job.range.start().get() as u64);
        sp.arg("pages", off as u64);
    }
    job.finish(None);
}

/// Moves `part` to `to`: the mechanism's migrations, with the pages of
/// other kinds than each pass moves left out of the report.
fn move_chunk(s: &Shared, part: PageRange, to: Location) -> Result<MigrationReport, PolicyError> {
    match to {
        Location::Device(d) => {
            let mem = s.hmm.device_memory(d).ok_or(PolicyError::UnknownDevice(d))?;
            Ok(s.hmm.migrate_here(part, &mem)?)
        }
        Location::System => {
            let map = s.hmm.residency_map(part);
            let mut devs: Vec<DeviceId> = map
                .runs()
                .iter()
                .filter_map(|(_, p)| match p {
                    Place::Device(d) => Some(*d),
                    _ => None,
                })
                .collect();
            devs.sort_unstable();
            devs.dedup();
            let mut report = MigrationReport::default();
            for d in devs {
                let Some(mem) = s.hmm.device_memory(d) else { continue };
                let mut r = s.hmm.migrate_to_system(part, &mem, mem.ops().dma())?;
                r.skipped.retain(|(_, why)| !matches!(why, SkipReason::NotSelected(_)));
                report.append(r);
            }
            Ok(report)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_takes_only_free_room_nearest_the_fault_first() {
        let mut b = Block::new(16);
        b.set_faulted(8);
        let mut mask = vec![true; 16];
        // Room for the faulted page and three more: 9 (after it), 7, 10.
        trim_to_free(&mut mask, &b, 4);
        let kept: Vec<usize> = (0..16).filter(|&i| mask[i]).collect();
        assert_eq!(kept, vec![7, 8, 9, 10]);
        // No room at all: the faulted page still goes (it may evict).
        let mut mask = vec![true; 16];
        trim_to_free(&mut mask, &b, 0);
        assert_eq!((0..16).filter(|&i| mask[i]).collect::<Vec<_>>(), vec![8]);
        // Room enough: nothing trimmed.
        let mut mask = vec![true; 16];
        trim_to_free(&mut mask, &b, 100);
        assert!(mask.iter().all(|m| *m));
    }
}
