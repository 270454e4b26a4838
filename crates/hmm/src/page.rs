//! Where each managed page's data lives: one 8-byte record per 4 KiB page.
//!
//! This module is pure logic (no system calls) so the state machine can be
//! tested on its own. The legal transitions, and who makes them:
//!
//! ```text
//!            fault service (zero fill)
//!   None ─────────────────────────────▶ System
//!    │  ▲                                 │
//!    │  └── REMOVE / UNMAP event ◀────────┤
//!    │                                    │ migration setup
//!    └─────────────▶ [migrating] ◀────────┘
//!                      │      │
//!      commit (copied) │      │ abort (restore the source)
//!                      ▼      ▼
//!   Device(dev, page) ◀─┘     └─▶ back to None / System / Device
//!    │   ▲
//!    │   └── migration to device (setup marks [migrating] again)
//!    ├──▶ [migrating] ──commit──▶ System   (fault-back, eviction, release)
//!    └──▶ Poisoned                          (its device failed)
//! ```
//!
//! `migrating` is a flag over the source state: while it is set, the page has
//! no CPU mapping (a CPU touch waits), the source is kept until the migration
//! commits or aborts, and no other migration may take the page. An
//! invalidation (the application discarded or unmapped the page) that arrives
//! during a migration sets `invalidated`: the migration then discards both
//! source and destination instead of installing either. An `mremap` that
//! arrives during a migration sets `invalidated` and `moved`: the page's data
//! now belongs at another address, and the migration hands whichever side
//! holds it to the remap forwarding (`crate::remap`) instead of dropping it.
//!
//! Every transition is made under the owning range's table lock.

#![forbid(unsafe_code)]

use std::fmt;

/// Identifies a device's memory region within one `Hmm` instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct DeviceId(pub(crate) u16);

impl DeviceId {
    /// The largest number of device regions an `Hmm` instance can hold.
    pub const MAX: usize = 1 << DEV_BITS;

    /// The identifier as a number (for display and indexing).
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dev{}", self.0)
    }
}

/// One page of a device's memory: which device, which page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DevicePage {
    /// The device region.
    pub dev: DeviceId,
    /// The page's index within the region.
    pub index: u32,
}

impl fmt::Display for DevicePage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.dev, self.index)
    }
}

/// Where a managed page's data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    /// Never populated (or discarded): reads as zeros; no memory is used.
    None,
    /// In system memory, mapped for the CPU.
    System,
    /// In a device page; the CPU mapping is absent and a touch faults it back.
    Device(DevicePage),
    /// Lost with its device: a CPU touch gets SIGBUS.
    Poisoned,
    /// No longer mapped: the application unmapped it.
    Unmapped,
}

const KIND_BITS: u32 = 3;
const KIND_MASK: u64 = (1 << KIND_BITS) - 1;
const MIGRATING: u64 = 1 << 3;
const INVALIDATED: u64 = 1 << 4;
/// With `INVALIDATED`: the invalidation was an unmap.
const GONE: u64 = 1 << 5;
/// With `INVALIDATED`: the application moved the page elsewhere (`mremap`).
const MOVED: u64 = 1 << 6;
/// With `K_DEVICE`: the device page is coherent memory mapped for the CPU at
/// the page's address (the CPU reaches it without faulting).
const CPU_MAPPED: u64 = 1 << 7;
const DEV_SHIFT: u32 = 8;
const DEV_BITS: u32 = 12;
const INDEX_SHIFT: u32 = 20;

const K_NONE: u64 = 0;
const K_SYSTEM: u64 = 1;
const K_DEVICE: u64 = 2;
const K_POISONED: u64 = 3;
const K_UNMAPPED: u64 = 4;

/// The per-page record: residency plus the migration flags, packed in 8 bytes.
///
/// Layout: bits 0-2 kind, bit 3 migrating, bit 4 invalidated, bit 5 unmapped
/// (with bit 4), bit 6 moved (with bit 4), bit 7 mapped for the CPU (a
/// coherent device page), bits 8-19 device, bits 20-51 device page index.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct PageEntry(u64);

const _: () = assert!(std::mem::size_of::<PageEntry>() == 8);
const _: () = assert!(INDEX_SHIFT + 32 <= 64 && DEV_SHIFT + DEV_BITS <= INDEX_SHIFT);

/// A transition the state machine does not allow: a bug in the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal page transition {op} from {from:?}")]
pub struct IllegalTransition {
    /// The transition tried.
    pub op: &'static str,
    /// The entry it was tried on.
    pub from: PageEntry,
}

impl PageEntry {
    /// A never-populated page.
    pub const NONE: PageEntry = PageEntry(K_NONE);
    /// A page in system memory.
    pub const SYSTEM: PageEntry = PageEntry(K_SYSTEM);

    /// The entry for `residency`, not migrating.
    pub fn new(residency: Residency) -> Self {
        match residency {
            Residency::None => Self(K_NONE),
            Residency::System => Self(K_SYSTEM),
            Residency::Device(p) => Self(
                K_DEVICE | (u64::from(p.dev.0) << DEV_SHIFT) | (u64::from(p.index) << INDEX_SHIFT),
            ),
            Residency::Poisoned => Self(K_POISONED),
            Residency::Unmapped => Self(K_UNMAPPED),
        }
    }

    /// Where the data lives (for a migrating page: the source, still authoritative).
    pub fn residency(self) -> Residency {
        match self.0 & KIND_MASK {
            K_NONE => Residency::None,
            K_SYSTEM => Residency::System,
            K_DEVICE => Residency::Device(DevicePage {
                dev: DeviceId(((self.0 >> DEV_SHIFT) & ((1 << DEV_BITS) - 1)) as u16),
                index: (self.0 >> INDEX_SHIFT) as u32,
            }),
            K_POISONED => Residency::Poisoned,
            _ => Residency::Unmapped,
        }
    }

    /// A migration owns the page.
    pub fn is_migrating(self) -> bool {
        self.0 & MIGRATING != 0
    }

    /// The application discarded or unmapped the page during its migration.
    pub fn is_invalidated(self) -> bool {
        self.0 & INVALIDATED != 0
    }

    /// The device page holding the data, when the page lives on a device.
    pub fn device_page(self) -> Option<DevicePage> {
        match self.residency() {
            Residency::Device(p) => Some(p),
            _ => None,
        }
    }

    /// Setup: a migration takes the page. Allowed from `None`, `System` and
    /// `Device` when no other migration holds it.
    pub fn begin_migration(&mut self) -> Result<(), IllegalTransition> {
        match self.residency() {
            Residency::None | Residency::System | Residency::Device(_) if !self.is_migrating() => {
                self.0 = (self.0 & !(INVALIDATED | GONE | MOVED)) | MIGRATING;
                Ok(())
            }
            _ => Err(IllegalTransition { op: "begin_migration", from: *self }),
        }
    }

    /// Commit: the copy reached `to`. Returns `false` when the page was
    /// invalidated meanwhile, and the caller frees a device `to`. The page is
    /// then `Unmapped` after an unmap; after a discard it is `None`, except
    /// when `to` is `System`: the copy was installed at the address, perhaps
    /// after the kernel emptied it, so a page may be there. It must then not
    /// read as `None` ("certainly empty"), or a later migration would take it
    /// for an empty page and move zeros instead of what the CPU wrote to it.
    pub fn commit(&mut self, to: Residency) -> Result<bool, IllegalTransition> {
        if !self.is_migrating() || !matches!(to, Residency::System | Residency::Device(_)) {
            return Err(IllegalTransition { op: "commit", from: *self });
        }
        if self.is_invalidated() {
            *self = match (self.0 & GONE != 0, to) {
                (true, _) => Self(K_UNMAPPED),
                (false, Residency::System) => Self::SYSTEM,
                (false, _) => Self::NONE,
            };
            return Ok(false);
        }
        *self = Self::new(to);
        Ok(true)
    }

    /// Abort: the source stays where it was. Returns `false` when the page was
    /// invalidated meanwhile: it is then `None` (`Unmapped` after an unmap)
    /// and the caller drops the source.
    pub fn abort(&mut self) -> Result<bool, IllegalTransition> {
        if !self.is_migrating() {
            return Err(IllegalTransition { op: "abort", from: *self });
        }
        if self.is_invalidated() {
            *self = if self.0 & GONE != 0 { Self(K_UNMAPPED) } else { Self::NONE };
            return Ok(false);
        }
        self.0 &= !MIGRATING;
        Ok(true)
    }

    /// The application discarded (`unmapped` false) or unmapped the page.
    /// Returns the device page to free, if the page lived on a device and no
    /// migration holds it (a migration frees what it holds when it ends).
    pub fn invalidate(&mut self, unmapped: bool) -> Option<DevicePage> {
        if self.is_migrating() {
            self.0 |= INVALIDATED | if unmapped { GONE } else { 0 };
            return None;
        }
        let freed = self.device_page();
        if self.residency() != Residency::Unmapped {
            *self = if unmapped { Self(K_UNMAPPED) } else { Self::NONE };
        }
        freed
    }

    /// Whether the page lives in coherent device memory that the CPU maps at
    /// its address (so a CPU touch reaches the device page without faulting).
    pub fn is_cpu_mapped(self) -> bool {
        self.0 & CPU_MAPPED != 0
    }

    /// Records that the page's coherent device page is (or is no longer)
    /// mapped for the CPU. Only for a page that lives on a device.
    pub fn set_cpu_mapped(&mut self, mapped: bool) -> Result<(), IllegalTransition> {
        if self.device_page().is_none() {
            return Err(IllegalTransition { op: "set_cpu_mapped", from: *self });
        }
        if mapped {
            self.0 |= CPU_MAPPED;
        } else {
            self.0 &= !CPU_MAPPED;
        }
        Ok(())
    }

    /// The application moved the page (`mremap`) while a migration holds it:
    /// the page is invalidated at this address, and whoever holds it hands its
    /// data on to the new one. Only for a migrating page.
    pub fn mark_moved(&mut self) -> Result<(), IllegalTransition> {
        if !self.is_migrating() {
            return Err(IllegalTransition { op: "mark_moved", from: *self });
        }
        self.0 |= INVALIDATED | MOVED;
        Ok(())
    }

    /// Whether the application unmapped the page: recorded `Unmapped`, or
    /// unmapped while a migration holds it.
    pub fn is_unmapped(self) -> bool {
        self.residency() == Residency::Unmapped
            || self.0 & (INVALIDATED | GONE) == INVALIDATED | GONE
    }

    /// Whether an `mremap` moved the page while a migration held it.
    pub fn is_moved(self) -> bool {
        self.0 & MOVED != 0
    }

    /// The fault service filled a never-populated page (`None` → `System`).
    pub fn populate(&mut self) -> Result<(), IllegalTransition> {
        match self.residency() {
            Residency::None | Residency::System if !self.is_migrating() => {
                *self = Self::SYSTEM;
                Ok(())
            }
            _ => Err(IllegalTransition { op: "populate", from: *self }),
        }
    }

    /// The page's device failed: returns the device page, now lost.
    pub fn poison(&mut self) -> Result<DevicePage, IllegalTransition> {
        match self.device_page() {
            Some(p) if !self.is_migrating() => {
                *self = Self(K_POISONED);
                Ok(p)
            }
            _ => Err(IllegalTransition { op: "poison", from: *self }),
        }
    }
}

impl fmt::Debug for PageEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.residency())?;
        if self.is_migrating() {
            f.write_str("+migrating")?;
        }
        if self.is_moved() {
            f.write_str("+moved")?;
        }
        if self.is_cpu_mapped() {
            f.write_str("+cpu-mapped")?;
        }
        if self.is_invalidated() {
            f.write_str("+invalidated")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dp(dev: u16, index: u32) -> DevicePage {
        DevicePage { dev: DeviceId(dev), index }
    }

    #[test]
    fn packs_every_residency_losslessly() {
        let max_dev = (DeviceId::MAX - 1) as u16;
        for r in [
            Residency::None,
            Residency::System,
            Residency::Device(dp(0, 0)),
            Residency::Device(dp(max_dev, u32::MAX)),
            Residency::Device(dp(7, 123_456)),
            Residency::Poisoned,
            Residency::Unmapped,
        ] {
            let e = PageEntry::new(r);
            assert_eq!(e.residency(), r);
            assert!(!e.is_migrating() && !e.is_invalidated());
        }
    }

    #[test]
    fn migration_to_device_commits_or_restores() {
        let mut e = PageEntry::SYSTEM;
        e.begin_migration().unwrap();
        assert!(e.is_migrating());
        assert_eq!(e.residency(), Residency::System, "the source stays authoritative");
        assert!(e.begin_migration().is_err(), "a second migration cannot take it");
        assert!(e.commit(Residency::Device(dp(1, 9))).unwrap());
        assert_eq!(e.device_page(), Some(dp(1, 9)));

        let mut e = PageEntry::NONE;
        e.begin_migration().unwrap();
        assert!(e.abort().unwrap());
        assert_eq!(e, PageEntry::NONE);
    }

    #[test]
    fn a_move_during_migration_is_an_invalidation_that_remembers_the_move() {
        let mut e = PageEntry::SYSTEM;
        assert!(e.mark_moved().is_err(), "only a held page can be moved on");
        let mut e = PageEntry::new(Residency::Device(dp(0, 3)));
        e.begin_migration().unwrap();
        e.mark_moved().unwrap();
        assert!(e.is_moved() && e.is_invalidated());
        assert!(!e.is_unmapped());
        assert_eq!(e.invalidate(true), None, "a later unmap of the old address frees nothing");
        assert!(e.is_unmapped());
        assert!(!e.abort().unwrap());
        assert!(e.is_unmapped());
        assert_eq!(e.residency(), Residency::Unmapped);
        assert!(!e.is_moved(), "the mark ends with the migration");

        let mut e = PageEntry::SYSTEM;
        e.begin_migration().unwrap();
        e.mark_moved().unwrap();
        assert!(!e.abort().unwrap());
        assert_eq!(e, PageEntry::NONE, "MREMAP_DONTUNMAP leaves the old address empty");
        e.begin_migration().unwrap();
        assert!(!e.is_moved(), "a new migration starts unmarked");
    }

    #[test]
    fn invalidation_during_migration_discards_both_sides() {
        let mut e = PageEntry::new(Residency::Device(dp(0, 3)));
        e.begin_migration().unwrap();
        assert_eq!(e.invalidate(false), None, "the migration frees what it holds");
        assert!(e.is_invalidated());
        assert!(!e.commit(Residency::System).unwrap());
        assert_eq!(e, PageEntry::SYSTEM, "the copy may have landed after the discard");

        let mut e = PageEntry::SYSTEM;
        e.begin_migration().unwrap();
        e.invalidate(false);
        assert!(!e.commit(Residency::Device(dp(0, 4))).unwrap());
        assert_eq!(e, PageEntry::NONE, "the staged source went with the discard");

        let mut e = PageEntry::SYSTEM;
        e.begin_migration().unwrap();
        e.invalidate(true);
        assert!(!e.abort().unwrap());
        assert_eq!(e.residency(), Residency::Unmapped);

        let mut e = PageEntry::new(Residency::Device(dp(0, 3)));
        e.begin_migration().unwrap();
        e.invalidate(true);
        assert!(!e.commit(Residency::System).unwrap());
        assert_eq!(e.residency(), Residency::Unmapped);
    }

    #[test]
    fn invalidation_frees_device_pages_and_marks_unmapped() {
        let mut e = PageEntry::new(Residency::Device(dp(2, 5)));
        assert_eq!(e.invalidate(false), Some(dp(2, 5)));
        assert_eq!(e, PageEntry::NONE);
        let mut e = PageEntry::new(Residency::Device(dp(2, 6)));
        assert_eq!(e.invalidate(true), Some(dp(2, 6)));
        assert_eq!(e.residency(), Residency::Unmapped);
        assert_eq!(e.invalidate(false), None);
        assert_eq!(e.residency(), Residency::Unmapped, "unmapped stays unmapped");
        assert!(e.begin_migration().is_err(), "an unmapped page cannot migrate");
    }

    #[test]
    fn only_device_pages_are_mapped_for_the_cpu_and_the_mark_goes_with_them() {
        assert!(PageEntry::SYSTEM.clone().set_cpu_mapped(true).is_err());
        let mut e = PageEntry::new(Residency::Device(dp(1, 2)));
        e.set_cpu_mapped(true).unwrap();
        assert!(e.is_cpu_mapped());
        assert_eq!(e.device_page(), Some(dp(1, 2)));
        e.begin_migration().unwrap();
        assert!(e.is_cpu_mapped(), "setup unmaps it, and says so");
        e.set_cpu_mapped(false).unwrap();
        assert!(e.abort().unwrap());
        assert!(!e.is_cpu_mapped());
        e.set_cpu_mapped(true).unwrap();
        assert_eq!(e.invalidate(true), Some(dp(1, 2)));
        assert!(!e.is_cpu_mapped(), "an unmapped page maps nothing");
        let mut e = PageEntry::new(Residency::Device(dp(1, 3)));
        e.set_cpu_mapped(true).unwrap();
        e.begin_migration().unwrap();
        assert!(e.commit(Residency::System).unwrap());
        assert!(!e.is_cpu_mapped());
    }

    #[test]
    fn illegal_transitions_are_refused() {
        let mut e = PageEntry::new(Residency::Poisoned);
        assert!(e.begin_migration().is_err());
        assert!(e.populate().is_err());
        assert!(PageEntry::SYSTEM.clone().commit(Residency::System).is_err());
        assert!(PageEntry::SYSTEM.clone().abort().is_err());
        let mut m = PageEntry::SYSTEM;
        m.begin_migration().unwrap();
        assert!(m.commit(Residency::Poisoned).is_err());
        assert!(m.populate().is_err());
        assert!(PageEntry::SYSTEM.clone().poison().is_err());
        let mut d = PageEntry::new(Residency::Device(dp(0, 1)));
        assert_eq!(d.poison().unwrap(), dp(0, 1));
        assert_eq!(d.residency(), Residency::Poisoned);
    }
}
