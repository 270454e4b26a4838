//! The per-input drivers of the fuzz targets, in one file that both the
//! `hmm-fuzz` crate (`fuzz/src/lib.rs`, for the targets in
//! `fuzz/fuzz_targets/`) and the stable test that replays the checked-in
//! corpus (`crates/hmm/tests/fuzz_corpus.rs`) include as a module. It uses
//! `hmm` and `std` only, so it builds on the stable toolchain.
//!
//! Each driver takes a fuzzer's bytes and returns `Err(violation)` when a
//! property fails; a fuzz target turns that into a panic (a crash libFuzzer
//! records), the replaying test into a failure that names the file. Run the
//! targets with `fuzz/run.sh ops|api [seconds]`, which passes the sanitizer
//! flags they need.
//!
//! - [`ops`]: the operations `hmm_tools::stress::decode` makes of the bytes, run by
//!   `hmm_tools::stress::replay` against its model of the bytes on a fresh
//!   instance. The property: hmm and the model never differ.
//! - [`Api`]: calls of the public API with arbitrary arguments (ranges
//!   unaligned, empty, overflowing, unmapped or outside what hmm manages,
//!   offsets past the end, sizes that cannot be mapped), decoded by
//!   [`decode_api`]. The property: no panic, no hang, no crash; every call
//!   returns `Ok` or an error that says what went wrong; and the few
//!   results that are certain hold (bytes written read back, a pinned page
//!   does not move, a read-only page is not written by a device, ...).

use std::fmt;
use std::time::Duration;

use hmm::os::mm::{Advise, Mapping, Protection};
use hmm::{
    FaultFlags, Hmm, HmmError, ManagedRange, PAGE_SIZE, PageRange, Pin, RangeError, RangeFault,
    Residency, VirtAddr,
};
use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};

// ---- ops: the model ---------------------------------------------------------------------

/// Pages of the range the `ops` driver runs on.
pub const OPS_PAGES: usize = 16;

/// Runs the operations `data` decodes to ([`hmm_tools::stress::decode`], at most
/// [`hmm_tools::stress::MAX_DECODED`]) on a fresh instance against the model
/// ([`hmm_tools::stress::replay`]): `Ok(Some(skipped))` when hmm and the model
/// agree (`skipped` operations this kernel cannot do, or past the unmap
/// budget), `Err` with the divergence when they differ. `Ok(None)` where
/// the instance cannot be made (hmm cannot run here): that is not a
/// divergence.
///
/// The operations fork (for `fork()` itself, and to see a lost page's
/// `SIGBUS` in a child), so a caller that runs other forking code at the
/// same time serializes with it.
pub fn ops(data: &[u8]) -> Result<Option<u64>, String> {
    let ops = hmm_tools::stress::decode(data, OPS_PAGES);
    match hmm_tools::stress::replay(&ops, OPS_PAGES) {
        Ok(Ok(skipped)) => Ok(Some(skipped)),
        Ok(Err(divergence)) => Err(divergence.to_string()),
        Err(_) => Ok(None),
    }
}

// ---- api: the public API with arbitrary arguments ---------------------------------------

/// Pages of the managed range every input of the `api` driver works on.
pub const SHARED_PAGES: usize = 64;

/// The largest [`Hmm::alloc`] the `api` driver makes (4 MiB): sizes past it
/// are only those no mapping can have, which must fail.
pub const ALLOC_CAP: usize = 4 << 20;

/// The most pages a call that returns (or allocates) something per page of
/// its range gets: [`SoftwareDevice::read`] allocates a buffer of the range's
/// length, `snapshot` and `range_fault` an entry per page (up to
/// `RangeFault::MAX_PAGES`, 4 GiB of address space, past which they refuse
/// the range), and `residency_map` lists a place per page when asked: kept
/// small, so that every call stays cheap. Longer ranges go to every other call.
pub const LISTED_CAP: usize = 1024;

/// The most bytes a CPU or device read or write moves (the buffer is made
/// first).
pub const ACCESS_CAP: usize = 16 << 10;

/// The most calls one input makes.
pub const MAX_CALLS: usize = 48;

/// The most pins one input holds at once (the oldest is dropped first).
const MAX_PINS: usize = 4;

/// Which managed range a call acts on. `Scratch` is the range the input
/// allocated last ([`ApiCall::Alloc`]); a call on it when there is none is
/// skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The range every input shares ([`SHARED_PAGES`] pages).
    Shared,
    /// The input's own range.
    Scratch,
}

/// Where a range or an address starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// The shared managed range.
    Shared,
    /// The input's own managed range (the shared one when there is none).
    Scratch,
    /// The end of the shared range (the first byte past it).
    SharedEnd,
    /// A plain anonymous mapping hmm does not manage.
    Plain,
    /// A read-only anonymous mapping hmm does not manage.
    ReadOnly,
    /// Address zero.
    Zero,
    /// The last page of the address space.
    Top,
    /// Any address.
    Raw(usize),
}

/// The length of a [`RangeSpec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Len {
    /// This many bytes (zero, unaligned, or past the end of everything).
    Bytes(usize),
    /// The whole mapping the base names (one page for the bases that name
    /// none).
    Whole,
}

/// A range (or an address, its start) as the bytes give it: a base, a
/// signed offset in bytes and a length. Resolved when the call runs, since
/// the input's own range is only known then; the result is whatever
/// [`PageRange::new`] makes of it, a refusal included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeSpec {
    /// Where it starts from.
    pub base: Base,
    /// Bytes from the base (wrapping).
    pub offset: isize,
    /// How long.
    pub len: Len,
}

/// An offset into a managed range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offset {
    /// From the start.
    Start(usize),
    /// Back from the end (wrapping below zero).
    End(usize),
}

/// One call of the public API, with the arguments the bytes gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiCall {
    /// [`ManagedRange::write`], then a read of the same bytes.
    CpuWrite {
        /// The range.
        target: Target,
        /// Where.
        at: Offset,
        /// Bytes (at most [`ACCESS_CAP`]).
        len: usize,
        /// Seed of the bytes.
        seed: u8,
    },
    /// [`ManagedRange::read`].
    CpuRead {
        /// The range.
        target: Target,
        /// Where.
        at: Offset,
        /// Bytes (at most [`ACCESS_CAP`]).
        len: usize,
    },
    /// [`ManagedRange::fill`] (any length: nothing is allocated), then a read
    /// of its first and last byte.
    Fill {
        /// The range.
        target: Target,
        /// Where.
        at: Offset,
        /// Bytes.
        len: usize,
        /// The byte.
        byte: u8,
    },
    /// [`ManagedRange::touch_read`], or `touch_write` and a read back.
    Touch {
        /// The range.
        target: Target,
        /// Where.
        at: Offset,
        /// A write of this byte rather than a read.
        write: Option<u8>,
    },
    /// [`ManagedRange::pages_range`]: the range it gives, if any, is the one
    /// `first` and `count` name, inside the range.
    PagesRange {
        /// The range.
        target: Target,
        /// First page.
        first: usize,
        /// Pages.
        count: usize,
    },
    /// [`Hmm::alloc`] (or `alloc_huge`): the result, if any, becomes the
    /// input's own range, replacing the last.
    Alloc {
        /// Bytes: at most [`ALLOC_CAP`], or one no mapping can have.
        len: usize,
        /// `alloc_huge`.
        huge: bool,
    },
    /// Drops the input's own range (pins of it may outlive it).
    DropScratch,
    /// [`ManagedRange::advise`]. `DontFork` only on the input's own range.
    Advise {
        /// The range whose method is called.
        target: Target,
        /// The part.
        range: RangeSpec,
        /// Index into the advice list.
        advice: u8,
    },
    /// [`ManagedRange::protect`] to read-only (or no access), then what the
    /// devices can do there (reads may fail; writes and write faults must),
    /// then read-write again, which must succeed.
    Protect {
        /// The range whose method is called.
        target: Target,
        /// The part.
        range: RangeSpec,
        /// No access rather than read-only.
        none: bool,
    },
    /// [`ManagedRange::pin`], kept until [`ApiCall::Unpin`] or the input
    /// ends; then a migration, which must leave every pinned page in place.
    Pin {
        /// The range whose method is called.
        target: Target,
        /// The part.
        range: RangeSpec,
        /// The device the migration tries.
        dev: usize,
    },
    /// Drops the last pin.
    Unpin,
    /// [`ManagedRange::unmap`] of the input's own range (never the shared
    /// one); a read of the part must then fail.
    Unmap {
        /// The part.
        range: RangeSpec,
    },
    /// [`SoftwareDevice::migrate_to_device`].
    ToDevice {
        /// The device.
        dev: usize,
        /// The range.
        range: RangeSpec,
    },
    /// [`SoftwareDevice::migrate_to_system`].
    ToSystem {
        /// The device.
        dev: usize,
        /// The range.
        range: RangeSpec,
    },
    /// [`SoftwareDevice::migrate_from`] the other device.
    FromPeer {
        /// The destination device.
        dev: usize,
        /// The range.
        range: RangeSpec,
    },
    /// [`SoftwareDevice::migrate_here`].
    Here {
        /// The device.
        dev: usize,
        /// The range.
        range: RangeSpec,
    },
    /// [`SoftwareDevice::read`]: the bytes, if any, are the range's length,
    /// and what a CPU read of managed memory there gives.
    DevRead {
        /// The device.
        dev: usize,
        /// The range (at most [`LISTED_CAP`] pages).
        range: RangeSpec,
    },
    /// [`SoftwareDevice::write`] at the spec's start: if it succeeds on
    /// managed memory, a CPU read gives the bytes.
    DevWrite {
        /// The device.
        dev: usize,
        /// The address (the spec's start; its length is ignored).
        at: RangeSpec,
        /// Bytes (at most [`ACCESS_CAP`]).
        len: usize,
        /// Seed of the bytes.
        seed: u8,
    },
    /// [`SoftwareDevice::make_exclusive`]: if it succeeds, a CPU touch of
    /// the first page revokes it ([`SoftwareDevice::check_exclusive`]).
    Exclusive {
        /// The device.
        dev: usize,
        /// The range.
        range: RangeSpec,
    },
    /// [`SoftwareDevice::snapshot`]: an entry per page.
    Snapshot {
        /// The device.
        dev: usize,
        /// The range (at most [`LISTED_CAP`] pages).
        range: RangeSpec,
    },
    /// [`Hmm::range_fault`] with arbitrary flags, per-page flags (of any
    /// length), owner and timeout: an entry per page.
    RangeFault {
        /// The range (at most [`LISTED_CAP`] pages).
        range: RangeSpec,
        /// Default flags (index into none, fault, write).
        flags: u8,
        /// Mask of the per-page flags (the same).
        mask: u8,
        /// Per-page flags (each the same).
        per_page: Vec<u8>,
        /// No owner, or device 0 or 1.
        owner: u8,
        /// Retry timeout in milliseconds.
        timeout_ms: u8,
    },
    /// Fault injection on a device, disarmed when the input ends: failed
    /// copies to system memory, DMA errors into the device, failed
    /// allocations (each a few at most).
    Inject {
        /// The device.
        dev: usize,
        /// Which.
        what: u8,
        /// First count.
        a: u8,
        /// Second count.
        b: u8,
    },
    /// The observers: [`Hmm::residency`] at the spec's start,
    /// [`Hmm::residency_map`] over it, the totals.
    Observe {
        /// The range.
        range: RangeSpec,
    },
}

/// The name of each kind of [`ApiCall`], by [`ApiCall::kind_index`].
pub const API_KINDS: [&str; 23] = [
    "cpu-write",
    "cpu-read",
    "fill",
    "touch",
    "pages-range",
    "alloc",
    "drop-scratch",
    "advise",
    "protect",
    "pin",
    "unpin",
    "unmap",
    "to-device",
    "to-system",
    "from-peer",
    "migrate-here",
    "device-read",
    "device-write",
    "exclusive",
    "snapshot",
    "range-fault",
    "inject",
    "observe",
];

impl ApiCall {
    /// Where the kind is named in [`API_KINDS`] (and the kind byte that
    /// decodes to it, modulo their number).
    pub fn kind_index(&self) -> usize {
        match self {
            ApiCall::CpuWrite { .. } => 0,
            ApiCall::CpuRead { .. } => 1,
            ApiCall::Fill { .. } => 2,
            ApiCall::Touch { .. } => 3,
            ApiCall::PagesRange { .. } => 4,
            ApiCall::Alloc { .. } => 5,
            ApiCall::DropScratch => 6,
            ApiCall::Advise { .. } => 7,
            ApiCall::Protect { .. } => 8,
            ApiCall::Pin { .. } => 9,
            ApiCall::Unpin => 10,
            ApiCall::Unmap { .. } => 11,
            ApiCall::ToDevice { .. } => 12,
            ApiCall::ToSystem { .. } => 13,
            ApiCall::FromPeer { .. } => 14,
            ApiCall::Here { .. } => 15,
            ApiCall::DevRead { .. } => 16,
            ApiCall::DevWrite { .. } => 17,
            ApiCall::Exclusive { .. } => 18,
            ApiCall::Snapshot { .. } => 19,
            ApiCall::RangeFault { .. } => 20,
            ApiCall::Inject { .. } => 21,
            ApiCall::Observe { .. } => 22,
        }
    }

    /// A short name of the kind.
    pub fn kind(&self) -> &'static str {
        API_KINDS[self.kind_index()]
    }
}

/// The advice [`ApiCall::Advise`] picks from; the last only on the input's
/// own range (a range that a child does not inherit).
const ADVICE: [Advise; 8] = [
    Advise::DontNeed,
    Advise::Free,
    Advise::Remove,
    Advise::PopulateRead,
    Advise::PopulateWrite,
    Advise::HugePage,
    Advise::NoHugePage,
    Advise::DontFork,
];

/// Lengths no mapping can have ([`ApiCall::Alloc`] must refuse them).
const IMPOSSIBLE_LENS: [usize; 4] = [usize::MAX, usize::MAX & !(PAGE_SIZE - 1), 1 << 60, 1 << 48];

/// Lengths of ranges past the end of everything, or of most of it.
const HUGE_LENS: [usize; 4] =
    [usize::MAX, usize::MAX & !(PAGE_SIZE - 1), 1 << 47, (LISTED_CAP + 1) * PAGE_SIZE];

/// The bytes of an input, read front to back; a byte past the end reads as
/// zero, so every input decodes.
struct Bytes<'a> {
    data: &'a [u8],
    at: usize,
}

impl Bytes<'_> {
    fn more(&self) -> bool {
        self.at < self.data.len()
    }

    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn u16(&mut self) -> usize {
        usize::from(u16::from_le_bytes([self.u8(), self.u8()]))
    }

    fn u64(&mut self) -> usize {
        let mut b = [0u8; 8];
        b.iter_mut().for_each(|x| *x = self.u8());
        u64::from_le_bytes(b) as usize
    }

    fn target(&mut self) -> Target {
        if self.u8() & 1 == 0 { Target::Shared } else { Target::Scratch }
    }

    fn dev(&mut self) -> usize {
        usize::from(self.u8() % 2)
    }

    /// An offset: small, spread over a few MiB, near the end, or anything.
    fn offset(&mut self) -> Offset {
        match self.u8() % 4 {
            0 => Offset::Start(self.u16()),
            1 => Offset::Start(self.u16() * 64),
            2 => Offset::End(self.u16()),
            _ => Offset::Start(self.u64()),
        }
    }

    /// A length of an access: at most [`ACCESS_CAP`], zero included.
    fn access_len(&mut self) -> usize {
        self.u16() % (ACCESS_CAP + 1)
    }

    /// A range: a base, then its shape: whole pages around the base, bytes
    /// around it (unaligned), a huge length, or the whole mapping.
    fn range(&mut self) -> RangeSpec {
        let base = match self.u8() % 8 {
            0 => Base::Shared,
            1 => Base::Scratch,
            2 => Base::SharedEnd,
            3 => Base::Plain,
            4 => Base::ReadOnly,
            5 => Base::Zero,
            6 => Base::Top,
            _ => Base::Raw(self.u64()),
        };
        let page = |b: u8| (b as i8 as isize) * PAGE_SIZE as isize;
        let (offset, len) = match self.u8() % 4 {
            0 => {
                let offset = page(self.u8());
                (offset, Len::Bytes(usize::from(self.u8()) * PAGE_SIZE))
            }
            1 => {
                let offset = self.u16() as u16 as i16 as isize;
                (offset, Len::Bytes(self.u16()))
            }
            2 => {
                let offset = page(self.u8());
                (offset, Len::Bytes(HUGE_LENS[usize::from(self.u8()) % HUGE_LENS.len()]))
            }
            _ => (0, Len::Whole),
        };
        RangeSpec { base, offset, len }
    }
}

/// The calls `data` decodes to: each takes a kind byte (modulo the number of
/// kinds, in [`API_KINDS`] order) and then the bytes its arguments need (a
/// missing byte reads as zero); at most [`MAX_CALLS`]. The same bytes always
/// give the same calls.
pub fn decode_api(data: &[u8]) -> Vec<ApiCall> {
    let mut b = Bytes { data, at: 0 };
    let mut out = Vec::new();
    while b.more() && out.len() < MAX_CALLS {
        let call = match usize::from(b.u8()) % API_KINDS.len() {
            0 => ApiCall::CpuWrite {
                target: b.target(),
                at: b.offset(),
                len: b.access_len(),
                seed: b.u8(),
            },
            1 => ApiCall::CpuRead { target: b.target(), at: b.offset(), len: b.access_len() },
            2 => {
                let (target, at) = (b.target(), b.offset());
                let len = match b.u8() % 4 {
                    0 => b.u16(),
                    1 => b.u16() * 64,
                    2 => b.u64(),
                    _ => 0,
                };
                ApiCall::Fill { target, at, len, byte: b.u8() }
            }
            3 => {
                let (target, at, w) = (b.target(), b.offset(), b.u8());
                ApiCall::Touch { target, at, write: (w & 1 == 1).then(|| b.u8()) }
            }
            4 => {
                let target = b.target();
                let (first, count) =
                    if b.u8() & 1 == 0 { (b.u16(), b.u16()) } else { (b.u64(), b.u64()) };
                ApiCall::PagesRange { target, first, count }
            }
            5 => {
                let how = b.u8();
                let len = match how % 4 {
                    0 => b.u16() % (ALLOC_CAP / PAGE_SIZE + 1) * PAGE_SIZE,
                    1 => b.u64() % (ALLOC_CAP + 1),
                    2 => IMPOSSIBLE_LENS[usize::from(b.u8()) % IMPOSSIBLE_LENS.len()],
                    _ => b.u16() % (ALLOC_CAP / PAGE_SIZE + 1) * PAGE_SIZE,
                };
                ApiCall::Alloc { len, huge: how % 4 == 3 }
            }
            6 => ApiCall::DropScratch,
            7 => ApiCall::Advise { target: b.target(), range: b.range(), advice: b.u8() },
            8 => ApiCall::Protect { target: b.target(), range: b.range(), none: b.u8() & 1 == 1 },
            9 => ApiCall::Pin { target: b.target(), range: b.range(), dev: b.dev() },
            10 => ApiCall::Unpin,
            11 => ApiCall::Unmap { range: b.range() },
            12 => ApiCall::ToDevice { dev: b.dev(), range: b.range() },
            13 => ApiCall::ToSystem { dev: b.dev(), range: b.range() },
            14 => ApiCall::FromPeer { dev: b.dev(), range: b.range() },
            15 => ApiCall::Here { dev: b.dev(), range: b.range() },
            16 => ApiCall::DevRead { dev: b.dev(), range: b.range() },
            17 => {
                ApiCall::DevWrite { dev: b.dev(), at: b.range(), len: b.access_len(), seed: b.u8() }
            }
            18 => ApiCall::Exclusive { dev: b.dev(), range: b.range() },
            19 => ApiCall::Snapshot { dev: b.dev(), range: b.range() },
            20 => {
                let range = b.range();
                let (flags, mask) = (b.u8(), b.u8());
                let n = usize::from(b.u8() % 8);
                let per_page = (0..n).map(|_| b.u8()).collect();
                ApiCall::RangeFault {
                    range,
                    flags,
                    mask,
                    per_page,
                    owner: b.u8(),
                    timeout_ms: b.u8() % 20,
                }
            }
            21 => ApiCall::Inject { dev: b.dev(), what: b.u8(), a: b.u8(), b: b.u8() },
            _ => ApiCall::Observe { range: b.range() },
        };
        out.push(call);
    }
    out
}

/// The flags a byte names (none, fault, fault writable).
fn flags(b: u8) -> FaultFlags {
    [FaultFlags::NONE, FaultFlags::FAULT, FaultFlags::WRITE][usize::from(b % 3)]
}

/// Bytes for a write: a pattern from `seed`, never all zeros.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i % 251) as u8) | 1).collect()
}

/// `Ok(Some(value))`, `Ok(None)` for an error that says what went wrong, or
/// the violation: an error with an empty message.
fn clear<T, E: fmt::Display + fmt::Debug>(res: Result<T, E>) -> Result<Option<T>, String> {
    match res {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.to_string().trim().is_empty() => {
            Err(format!("an error that says nothing: {e:?}"))
        }
        Err(_) => Ok(None),
    }
}

/// What one input works on: an instance, a managed range, two devices with
/// different engines (and different answers to a full device), and two
/// mappings hmm does not manage. Made once per process and reused by every
/// input, which leaves it as it found it: an input's destructive calls
/// (unmap, `DontFork`) act only on memory it allocated itself, its pins and
/// armed faults end with it, protections are restored within the call, and
/// each input starts with the shared range back in system memory and empty.
#[derive(Debug)]
pub struct Api {
    // Dropped in this order: the range and the devices before the instance.
    shared: ManagedRange,
    devs: [SoftwareDevice; 2],
    plain: Mapping,
    read_only: Mapping,
    hmm: Hmm,
}

impl Api {
    /// The instance and what it works on; `Err` where hmm cannot run.
    pub fn new() -> Result<Self, HmmError> {
        let hmm = Hmm::new()?;
        let devs = [
            // The zero-copy engine; a full device refuses.
            SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("fuzz0", 64 * PAGE_SIZE))?,
            // The copying engine; a full device evicts.
            SoftwareDevice::new(
                &hmm,
                SoftwareDeviceConfig::new("fuzz1", 96 * PAGE_SIZE).with_copy_engine(2).evicting(),
            )?,
        ];
        let shared = hmm.alloc(SHARED_PAGES * PAGE_SIZE)?;
        let plain = Mapping::anonymous(16 * PAGE_SIZE, Protection::ReadWrite)?;
        let read_only = Mapping::anonymous(16 * PAGE_SIZE, Protection::Read)?;
        Ok(Self { shared, devs, plain, read_only, hmm })
    }

    /// Runs the calls `data` decodes to ([`decode_api`]); `Err` names the
    /// first call that broke a property, and how.
    pub fn run(&self, data: &[u8]) -> Result<(), String> {
        let calls = decode_api(data);
        self.disarm();
        self.reset();
        let mut s = Session { api: self, scratch: None, pins: Vec::new() };
        let mut res = Ok(());
        for (i, call) in calls.iter().enumerate() {
            if let Err(what) = s.call(call).and_then(|()| s.accounting()) {
                res = Err(format!("call {i} ({call:?}): {what}"));
                break;
            }
        }
        if res.is_ok() {
            res = s.finish().map_err(|what| format!("after the last call: {what}"));
        }
        drop(s);
        self.disarm();
        res
    }

    /// Disarms every injected fault.
    fn disarm(&self) {
        for d in &self.devs {
            d.fail_next_copies_to_system(0);
            d.fail_copies_to_device(0, 0);
            d.memory().fail_next_allocs(0);
        }
    }

    /// The shared range back in system memory, then emptied, so that an
    /// input does the same whatever ran before it. (Errors here are the
    /// next input's to meet.)
    fn reset(&self) {
        for d in &self.devs {
            let _ = d.migrate_to_system(self.shared.range());
        }
        let _ = self.shared.advise(self.shared.range(), Advise::DontNeed);
    }
}

/// One input's run: its own range and pins.
struct Session<'a> {
    api: &'a Api,
    scratch: Option<ManagedRange>,
    pins: Vec<Pin>,
}

impl Session<'_> {
    fn target(&self, t: Target) -> Option<&ManagedRange> {
        match t {
            Target::Shared => Some(&self.api.shared),
            Target::Scratch => self.scratch.as_ref(),
        }
    }

    fn offset(r: &ManagedRange, at: Offset) -> usize {
        match at {
            Offset::Start(n) => n,
            Offset::End(n) => r.len().wrapping_sub(n),
        }
    }

    /// The range a spec names (or why [`PageRange::new`] refuses it).
    fn resolve(&self, spec: &RangeSpec) -> Result<PageRange, RangeError> {
        let (start, len) = self.place(spec);
        PageRange::new(VirtAddr::new(start), len)
    }

    /// The start and length a spec names, unchecked.
    fn place(&self, spec: &RangeSpec) -> (usize, usize) {
        let api = self.api;
        let scratch = self.scratch.as_ref().map_or(api.shared.range(), ManagedRange::range);
        let (base, whole) = match spec.base {
            Base::Shared => (api.shared.addr().get(), api.shared.len()),
            Base::Scratch => (scratch.start().get(), scratch.len()),
            Base::SharedEnd => (api.shared.range().end().get(), PAGE_SIZE),
            Base::Plain => (api.plain.addr().get(), api.plain.len()),
            Base::ReadOnly => (api.read_only.addr().get(), api.read_only.len()),
            Base::Zero => (0, PAGE_SIZE),
            Base::Top => (usize::MAX & !(PAGE_SIZE - 1), PAGE_SIZE),
            Base::Raw(a) => (a, PAGE_SIZE),
        };
        let len = match spec.len {
            Len::Bytes(n) => n,
            Len::Whole => whole,
        };
        (base.wrapping_add_signed(spec.offset), len)
    }

    /// The range a spec names, for a call that lists its pages: `None` (the
    /// call is skipped) when it is refused or longer than [`LISTED_CAP`].
    fn listed(&self, spec: &RangeSpec) -> Option<PageRange> {
        self.resolve(spec).ok().filter(|r| r.pages() <= LISTED_CAP)
    }

    /// The managed range holding all of `[addr, addr + len)`, and the offset
    /// of `addr` in it.
    fn owner(&self, addr: usize, len: usize) -> Option<(&ManagedRange, usize)> {
        let end = addr.checked_add(len)?;
        [Some(&self.api.shared), self.scratch.as_ref()].into_iter().flatten().find_map(|r| {
            let off = addr.checked_sub(r.addr().get())?;
            (end <= r.range().end().get()).then_some((r, off))
        })
    }

    fn dev(&self, d: usize) -> &SoftwareDevice {
        &self.api.devs[d % 2]
    }

    /// Runs one call; `Err` is a broken property.
    fn call(&mut self, call: &ApiCall) -> Result<(), String> {
        let api = self.api;
        match *call {
            ApiCall::CpuWrite { target, at, len, seed } => {
                let Some(r) = self.target(target) else { return Ok(()) };
                let at = Self::offset(r, at);
                let data = pattern(seed, len);
                if clear(r.write(at, &data))?.is_some() {
                    let mut back = vec![0u8; len];
                    r.read(at, &mut back).map_err(|e| format!("reading back the write: {e}"))?;
                    if back != data {
                        return Err("a read right after a write gave other bytes".into());
                    }
                }
            }
            ApiCall::CpuRead { target, at, len } => {
                let Some(r) = self.target(target) else { return Ok(()) };
                let mut buf = vec![0u8; len];
                clear(r.read(Self::offset(r, at), &mut buf))?;
            }
            ApiCall::Fill { target, at, len, byte } => {
                let Some(r) = self.target(target) else { return Ok(()) };
                let at = Self::offset(r, at);
                if clear(r.fill(at, len, byte))?.is_some() && len > 0 {
                    for i in [at, at + len - 1] {
                        let got =
                            r.touch_read(i).map_err(|e| format!("reading filled byte: {e}"))?;
                        if got != byte {
                            return Err(format!("filled byte {i} reads {got:#x}, not {byte:#x}"));
                        }
                    }
                }
            }
            ApiCall::Touch { target, at, write } => {
                let Some(r) = self.target(target) else { return Ok(()) };
                let at = Self::offset(r, at);
                match write {
                    None => {
                        clear(r.touch_read(at))?;
                    }
                    Some(v) => {
                        if clear(r.touch_write(at, v))?.is_some() {
                            let got = r.touch_read(at).map_err(|e| format!("reading back: {e}"))?;
                            if got != v {
                                return Err(format!(
                                    "byte {at} reads {got:#x} after writing {v:#x}"
                                ));
                            }
                        }
                    }
                }
            }
            ApiCall::PagesRange { target, first, count } => {
                let Some(r) = self.target(target) else { return Ok(()) };
                let want = first
                    .checked_mul(PAGE_SIZE)
                    .zip(count.checked_mul(PAGE_SIZE))
                    .and_then(|(off, len)| r.range().subrange(off, len).ok());
                let got = clear(r.pages_range(first, count))?;
                if got != want {
                    return Err(format!(
                        "pages_range({first}, {count}) of {} gave {got:?}, not {want:?}",
                        r.range()
                    ));
                }
            }
            ApiCall::Alloc { len, huge } => {
                let res = if huge { api.hmm.alloc_huge(len) } else { api.hmm.alloc(len) };
                if let Some(r) = clear(res)? {
                    if r.len() != len {
                        return Err(format!("asked for {len} bytes, got {}", r.len()));
                    }
                    self.scratch = Some(r);
                }
            }
            ApiCall::DropScratch => self.scratch = None,
            ApiCall::Advise { target, range, advice } => {
                let advice = ADVICE[usize::from(advice) % ADVICE.len()];
                if advice == Advise::DontFork && target != Target::Scratch {
                    return Ok(());
                }
                let Some(r) = self.target(target) else { return Ok(()) };
                if let Ok(part) = self.resolve(&range) {
                    clear(r.advise(part, advice))?;
                }
            }
            ApiCall::Protect { target, range, none } => {
                let Some(r) = self.target(target) else { return Ok(()) };
                let Ok(part) = self.resolve(&range) else { return Ok(()) };
                let prot = if none { Protection::None } else { Protection::Read };
                if clear(r.protect(part, prot))?.is_none() {
                    return Ok(());
                }
                let seen = self.protected(part);
                let restored = r.protect(part, Protection::ReadWrite);
                seen?;
                restored.map_err(|e| format!("{part} cannot be made writable again: {e}"))?;
            }
            ApiCall::Pin { target, range, dev } => {
                let Some(r) = self.target(target) else { return Ok(()) };
                let Ok(part) = self.resolve(&range) else { return Ok(()) };
                let Some(pin) = clear(r.pin(part))? else { return Ok(()) };
                clear(self.dev(dev).migrate_to_device(part))?;
                let first = (part.start().get() - r.addr().get()) / PAGE_SIZE;
                if let Some(p) = (first..first + part.pages())
                    .find(|p| !matches!(r.residency(*p), Residency::System))
                {
                    let now = r.residency(p);
                    return Err(format!(
                        "pinned page {p} is recorded {now:?}, not in system memory"
                    ));
                }
                if self.pins.len() == MAX_PINS {
                    self.pins.remove(0);
                }
                self.pins.push(pin);
            }
            ApiCall::Unpin => {
                self.pins.pop();
            }
            ApiCall::Unmap { range } => {
                let Some(r) = self.scratch.as_ref() else { return Ok(()) };
                let Ok(part) = self.resolve(&range) else { return Ok(()) };
                if clear(r.unmap(part))?.is_some() {
                    let at = part.start().get() - r.addr().get();
                    if r.read(at, &mut [0u8; 1]).is_ok() {
                        return Err(format!("{part} reads after it was unmapped"));
                    }
                }
            }
            ApiCall::ToDevice { dev, range } => {
                if let Ok(range) = self.resolve(&range) {
                    clear(self.dev(dev).migrate_to_device(range))?;
                }
            }
            ApiCall::ToSystem { dev, range } => {
                if let Ok(range) = self.resolve(&range) {
                    clear(self.dev(dev).migrate_to_system(range))?;
                }
            }
            ApiCall::FromPeer { dev, range } => {
                if let Ok(range) = self.resolve(&range) {
                    clear(self.dev(dev).migrate_from(range, self.dev(dev + 1)))?;
                }
            }
            ApiCall::Here { dev, range } => {
                if let Ok(range) = self.resolve(&range) {
                    clear(self.dev(dev).migrate_here(range))?;
                }
            }
            ApiCall::DevRead { dev, range } => {
                let Some(range) = self.listed(&range) else { return Ok(()) };
                let Some((bytes, _)) = clear(self.dev(dev).read(range))? else { return Ok(()) };
                if bytes.len() != range.len() {
                    return Err(format!("{} bytes read of {}", bytes.len(), range.len()));
                }
                if let Some((r, at)) = self.owner(range.start().get(), range.len()) {
                    let mut cpu = vec![0u8; range.len()];
                    if clear(r.read(at, &mut cpu))?.is_some() && cpu != bytes {
                        return Err("the device and the CPU read different bytes".into());
                    }
                }
            }
            ApiCall::DevWrite { dev, at, len, seed } => {
                // Any address: unaligned, unmapped, or the last bytes of
                // the address space.
                let addr = VirtAddr::new(self.place(&at).0);
                let data = pattern(seed, len);
                if clear(self.dev(dev).write(addr, &data))?.is_none() {
                    return Ok(());
                }
                if let Some((r, off)) = self.owner(addr.get(), len) {
                    let mut cpu = vec![0u8; len];
                    r.read(off, &mut cpu)
                        .map_err(|e| format!("reading the device's write: {e}"))?;
                    if cpu != data {
                        return Err("the CPU reads other bytes than the device wrote".into());
                    }
                }
            }
            ApiCall::Exclusive { dev, range } => {
                let Ok(range) = self.resolve(&range) else { return Ok(()) };
                let d = self.dev(dev);
                if clear(d.make_exclusive(range))?.is_none() {
                    return Ok(());
                }
                let Some((r, at)) = self.owner(range.start().get(), PAGE_SIZE) else {
                    return Err(format!("exclusive access granted to unmanaged {range}"));
                };
                r.touch_read(at).map_err(|e| format!("a CPU touch after exclusive: {e}"))?;
                let page = PageRange::new(range.start(), PAGE_SIZE).map_err(|e| e.to_string())?;
                d.check_exclusive(page).map_err(|e| format!("a CPU touch did not revoke: {e}"))?;
            }
            ApiCall::Snapshot { dev, range } => {
                let Some(range) = self.listed(&range) else { return Ok(()) };
                if let Some(s) = clear(self.dev(dev).snapshot(range))?
                    && s.len() != range.pages()
                {
                    return Err(format!("{} entries for {} pages", s.len(), range.pages()));
                }
            }
            ApiCall::RangeFault { ref range, flags: f, mask, ref per_page, owner, timeout_ms } => {
                let Some(range) = self.listed(range) else { return Ok(()) };
                let per_page: Vec<FaultFlags> = per_page.iter().map(|b| flags(*b)).collect();
                let owner = match owner % 3 {
                    0 => None,
                    o => Some(self.dev(usize::from(o) - 1).memory().id()),
                };
                let req = RangeFault {
                    range,
                    default_flags: flags(f),
                    flags_mask: flags(mask),
                    per_page: &per_page,
                    owner,
                    timeout: Duration::from_millis(u64::from(timeout_ms)),
                };
                if let Some(pages) = clear(api.hmm.range_fault(&req))?
                    && pages.len() != range.pages()
                {
                    return Err(format!("{} entries for {} pages", pages.len(), range.pages()));
                }
            }
            ApiCall::Inject { dev, what, a, b } => {
                let d = self.dev(dev);
                match what % 3 {
                    0 => d.fail_next_copies_to_system(u32::from(a % 4)),
                    1 => d.fail_copies_to_device(u32::from(a % 8), u32::from(b % 4)),
                    _ => d.memory().fail_next_allocs(u32::from(a % 3)),
                }
            }
            ApiCall::Observe { range } => {
                if let Ok(range) = self.resolve(&range) {
                    let _ = api.hmm.residency(range.start());
                }
                if let Some(range) = self.listed(&range) {
                    let map = api.hmm.residency_map(range);
                    let _ = map.to_string();
                }
                let _ = (api.hmm.residence(), api.shared.residency_map(), api.shared.stats());
                let _ = (api.hmm.fault_stats(), api.hmm.metadata());
            }
        }
        Ok(())
    }

    /// What the devices meet on `part`, just made read-only or inaccessible
    /// for the CPU: reads, snapshots and faults for reading may go either
    /// way; a device write, or a fault for writing, must fail.
    fn protected(&self, part: PageRange) -> Result<(), String> {
        for d in &self.api.devs {
            if part.pages() <= LISTED_CAP {
                clear(d.read(part))?;
                clear(d.snapshot(part))?;
            }
            if d.write(part.start(), &[0x5a]).is_ok() {
                return Err(format!("a device wrote to {part}, which the CPU may not write"));
            }
        }
        if part.pages() <= LISTED_CAP {
            let write = RangeFault::fault(part, true, None);
            if self.api.hmm.range_fault(&write).is_ok() {
                return Err(format!("range_fault for writing succeeded on {part}, not writable"));
            }
            clear(self.api.hmm.range_fault(&RangeFault::fault(part, false, None)))?;
        }
        Ok(())
    }

    /// The accounting: each range's parts sum to its length.
    fn accounting(&self) -> Result<(), String> {
        for r in [Some(&self.api.shared), self.scratch.as_ref()].into_iter().flatten() {
            let total = r.residence().total();
            if total != r.len() as u64 {
                return Err(format!(
                    "{}: accounting sums to {total} of {} bytes",
                    r.range(),
                    r.len()
                ));
            }
        }
        Ok(())
    }

    /// After the last call (its pins dropped): every byte of the shared
    /// range reads, the pages on devices coming back.
    fn finish(&mut self) -> Result<(), String> {
        self.pins.clear();
        let mut b = vec![0u8; self.api.shared.len()];
        self.api.shared.read(0, &mut b).map_err(|e| format!("reading the shared range: {e}"))?;
        Ok(())
    }
}
