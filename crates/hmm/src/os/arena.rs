//! A bump arena: ordinary Rust values placed in a mapping, typically memory
//! that hmm manages and migrates.
//!
//! The rest of the OS layer never lends a mapping's bytes out as Rust
//! references (see [`mm`](super::mm)). An [`Arena`] is the one exception, made
//! sound by taking the mapping away from everything else first: it *claims* a
//! [`guarded`](Mapping::guarded) mapping, after which every `Mapping` method
//! that reads, writes, discards, protects or unmaps its bytes refuses with
//! [`RangeError::Claimed`](crate::addr::RangeError::Claimed). What can still
//! happen to the bytes is what hmm does to managed memory: a migration moves a
//! page out (a CPU touch then waits in the fault service) and brings the same
//! bytes back, and a device failure poisons a page (a touch is then SIGBUS, never
//! a wrong byte).
//!
//! Values are never dropped: the arena hands out `&mut T` for its own lifetime
//! and forgets them when it goes, as a bump allocator does. Put plain data there
//! (nodes with indices or references into the same arena); a value that owns
//! heap memory leaks it.

use std::alloc::Layout;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::mm::{ClaimRefused, Mapping};
use crate::addr::PageRange;

/// Why an arena could not be made, or could not allocate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArenaError {
    /// Not enough room left.
    #[error(
        "the arena is full: {used} of {capacity} bytes used, {wanted} more wanted \
         (alignment {align}): make a bigger arena"
    )]
    Full {
        /// Bytes asked for.
        wanted: usize,
        /// Their alignment.
        align: usize,
        /// Bytes in use (including padding).
        used: usize,
        /// Size of the arena.
        capacity: usize,
    },
    /// A slice whose size overflows `isize`.
    #[error("a slice of {count} values of {size} bytes is too large for any arena")]
    TooLarge {
        /// Number of values.
        count: usize,
        /// Size of one.
        size: usize,
    },
    /// The mapping cannot be lent.
    #[error("{range} cannot hold an arena: {why}")]
    Refused {
        /// The mapping.
        range: PageRange,
        /// Why not.
        why: &'static str,
    },
}

/// A bump allocator over a mapping owned by `O` (see the [module docs](self)).
///
/// `alloc` takes `&self` and may be called from several threads at once; each
/// call gets its own bytes.
pub struct Arena<O: Send + Sync + 'static> {
    owner: Arc<O>,
    memory: for<'a> fn(&'a O) -> &'a Mapping,
    range: PageRange,
    /// Bytes handed out so far, padding included.
    next: AtomicUsize,
}

impl<O: Send + Sync + 'static> fmt::Debug for Arena<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Arena")
            .field("range", &self.range)
            .field("used", &self.used())
            .finish_non_exhaustive()
    }
}

impl<O: Send + Sync + 'static> Arena<O> {
    /// Makes an arena over the mapping `memory(&owner)`, which must be
    /// [`guarded`](Mapping::guarded), have no holes, and not be lent already.
    /// The arena keeps `owner` (and so the mapping) alive, and gives the mapping
    /// back to its other users when dropped.
    pub fn new(
        owner: Arc<O>,
        memory: for<'a> fn(&'a O) -> &'a Mapping,
    ) -> Result<Self, ArenaError> {
        let m = memory(&owner);
        let range = m.range();
        m.claim().map_err(|r| ArenaError::Refused {
            range,
            why: match r {
                ClaimRefused::NotGuarded => "it was not made with `Mapping::guarded`",
                ClaimRefused::Claimed => "it already holds an arena",
                ClaimRefused::Holes => "parts of it were unmapped",
            },
        })?;
        Ok(Self { owner, memory, range, next: AtomicUsize::new(0) })
    }

    /// The owner of the memory.
    pub fn owner(&self) -> &O {
        &self.owner
    }

    /// The arena's memory: hand it to a migration to move the values.
    pub fn range(&self) -> PageRange {
        self.range
    }

    /// Size in bytes.
    pub fn capacity(&self) -> usize {
        self.range.len()
    }

    /// Bytes handed out, padding included.
    pub fn used(&self) -> usize {
        self.next.load(Ordering::Relaxed)
    }

    /// Reserves `layout` and returns its address.
    fn reserve(&self, layout: Layout) -> Result<usize, ArenaError> {
        let base = self.range.start().get();
        let cap = self.range.len();
        let mut at = 0;
        self.next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                let start = (base + used).checked_next_multiple_of(layout.align())? - base;
                let end = start.checked_add(layout.size())?;
                at = start;
                (end <= cap).then_some(end)
            })
            .map(|_| base + at)
            .map_err(|used| ArenaError::Full {
                wanted: layout.size(),
                align: layout.align(),
                used,
                capacity: cap,
            })
    }

    /// Moves `value` into the arena.
    // Each call hands out bytes no other call gets: `&self` to `&mut T` is the
    // point of a bump arena.
    #[allow(clippy::mut_from_ref)]
    pub fn alloc<T>(&self, value: T) -> Result<&mut T, ArenaError> {
        let p = self.reserve(Layout::new::<T>())? as *mut T;
        // SAFETY: `p` is aligned for `T` and its `size_of::<T>()` bytes lie inside
        // the claimed mapping, reserved by this call alone (the bump only grows),
        // so nothing else reads or writes them: `Mapping`'s own accessors refuse
        // while the arena holds the claim, and the mapping lives as long as
        // `self.owner`, which outlives the returned borrow of `self`.
        unsafe { p.write(value) };
        // SAFETY: written just above; exclusive as explained there.
        Ok(unsafe { &mut *p })
    }

    /// A slice of `len` values made by `f(index)`.
    #[allow(clippy::mut_from_ref)] // as in `alloc`
    pub fn alloc_slice_with<T>(
        &self,
        len: usize,
        mut f: impl FnMut(usize) -> T,
    ) -> Result<&mut [T], ArenaError> {
        let layout = Layout::array::<T>(len)
            .map_err(|_| ArenaError::TooLarge { count: len, size: size_of::<T>() })?;
        let p = self.reserve(layout)? as *mut T;
        for i in 0..len {
            let v = f(i);
            // SAFETY: as in `alloc`: element `i` of a reserved, aligned array.
            let slot = unsafe { p.add(i) };
            // SAFETY: `slot` is reserved, aligned and this call's alone.
            unsafe { slot.write(v) };
        }
        // SAFETY: the `len` elements were written above; the bytes are this
        // call's alone for the borrow of `self` (see `alloc`).
        Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
    }

    /// A copy of `src` in the arena.
    #[allow(clippy::mut_from_ref)] // as in `alloc`
    pub fn alloc_slice_copy<T: Copy>(&self, src: &[T]) -> Result<&mut [T], ArenaError> {
        self.alloc_slice_with(src.len(), |i| src[i])
    }

    /// A copy of `s` in the arena.
    #[allow(clippy::mut_from_ref)] // as in `alloc`
    pub fn alloc_str(&self, s: &str) -> Result<&mut str, ArenaError> {
        let bytes = self.alloc_slice_copy(s.as_bytes())?;
        // Copied from a `str`, so valid UTF-8.
        Ok(std::str::from_utf8_mut(bytes).expect("copied from a str"))
    }
}

impl<O: Send + Sync + 'static> Drop for Arena<O> {
    fn drop(&mut self) {
        // Every reference handed out borrowed `self`, so none is left.
        (self.memory)(&self.owner).unclaim();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{PAGE_SIZE, RangeError};
    use crate::os::mm::Protection;

    fn arena(pages: usize) -> Arena<Mapping> {
        let m = Mapping::anonymous(pages * PAGE_SIZE, Protection::ReadWrite).unwrap().guarded();
        Arena::new(Arc::new(m), |m| m).unwrap()
    }

    #[test]
    fn values_are_aligned_disjoint_and_keep_their_bytes() {
        let a = arena(4);
        let x = a.alloc(7u8).unwrap();
        let y = a.alloc(0x1122_3344_5566_7788u64).unwrap();
        let z = a.alloc(u128::MAX).unwrap();
        assert_eq!((y as *mut u64 as usize) % 8, 0);
        assert_eq!((z as *mut u128 as usize) % align_of::<u128>(), 0);
        *x += 1;
        *y ^= 0xff;
        assert_eq!((*x, *y, *z), (8, 0x1122_3344_5566_7777, u128::MAX));
        let s = a.alloc_slice_with(1000, |i| i as u32 * 3).unwrap();
        assert!(s.iter().enumerate().all(|(i, v)| *v == i as u32 * 3));
        assert_eq!(a.alloc_str("héllo").unwrap(), "héllo");
        assert!(a.used() >= 1 + 8 + 16 + 4000 + 6);
    }

    #[test]
    fn full_arena_says_how_full() {
        let a = arena(1);
        a.alloc_slice_with(PAGE_SIZE - 8, |_| 0u8).unwrap();
        let e = a.alloc([0u8; 16]).unwrap_err();
        assert_eq!(
            e,
            ArenaError::Full { wanted: 16, align: 1, used: PAGE_SIZE - 8, capacity: PAGE_SIZE }
        );
        assert!(e.to_string().contains("make a bigger arena"), "{e}");
        assert!(matches!(
            a.alloc_slice_with(usize::MAX / 2, |_| 0u64),
            Err(ArenaError::TooLarge { .. })
        ));
        // What fits still fits.
        assert_eq!(*a.alloc(5u64).unwrap(), 5);
    }

    #[test]
    fn claimed_mapping_refuses_other_access_until_the_arena_goes() {
        let m = Arc::new(Mapping::anonymous(PAGE_SIZE, Protection::ReadWrite).unwrap().guarded());
        let a = Arena::new(m.clone(), |m| m).unwrap();
        *a.alloc(1u32).unwrap() = 9;
        assert!(m.is_claimed());
        assert_eq!(m.touch_read(0), Err(RangeError::Claimed(m.range())));
        assert!(m.write(0, &[1]).is_err());
        assert!(m.punch(m.range()).is_err());
        assert!(m.advise(m.range(), crate::os::mm::Advise::DontNeed).is_err());
        let again = Arena::new(m.clone(), |m| m).unwrap_err();
        assert!(matches!(again, ArenaError::Refused { why: "it already holds an arena", .. }));
        drop(a);
        assert!(!m.is_claimed());
        let mut b = [0u8; 4];
        m.read(0, &mut b).unwrap();
        assert_eq!(u32::from_ne_bytes(b), 9);
    }

    #[test]
    fn unguarded_or_punched_mappings_are_refused() {
        let m = Mapping::anonymous(PAGE_SIZE, Protection::ReadWrite).unwrap();
        assert!(matches!(
            Arena::new(Arc::new(m), |m| m),
            Err(ArenaError::Refused { why: "it was not made with `Mapping::guarded`", .. })
        ));
        let m = Mapping::anonymous(2 * PAGE_SIZE, Protection::ReadWrite).unwrap().guarded();
        m.punch(m.subrange(PAGE_SIZE, PAGE_SIZE).unwrap()).unwrap();
        assert!(matches!(
            Arena::new(Arc::new(m), |m| m),
            Err(ArenaError::Refused { why: "parts of it were unmapped", .. })
        ));
    }
}
