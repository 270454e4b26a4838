//! Where compressed pages live: slabs carved into slots by size class.
//!
//! A compressed page of `len` bytes takes a slot of the smallest class that
//! holds it (classes every [`CLASS_STEP`] bytes, up to the device's
//! threshold), in a slab given to that class. A class's slabs are one to
//! [`SLAB_PAGES_MAX`] pages long, whichever wastes least at the slab's end
//! (as zsmalloc sizes its zspages). So the device's memory is counted in
//! what it really holds: its footprint is the slabs in use, the compressed
//! bytes plus the allocator's waste (the rounding up to a class, the slab's
//! tail, and the free slots of partly used slabs), and its capacity bounds
//! the memory of every slab it holds.
//!
//! # Invariants
//!
//! - A slab is in exactly one state: *fresh* (no memory, on `fresh`),
//!   *empty* (memory, no class, on `empty[pages]`), or *in use* by one class
//!   (`class != NO_CLASS`); an in-use slab that is not full is on its
//!   class's `partial` list. The lists are threaded through the slabs
//!   themselves (`prev`/`next`), so moving a slab between them allocates
//!   nothing.
//! - Slots of an in-use slab are carved on demand (`carved`); freed slots
//!   form a list threaded through their own first two bytes (`free_head`).
//! - Every record `Stored { slab, slot, len }` names a slot in use, and
//!   `used` counts them per slab.
//! - `held_bytes` (the memory of every slab that has some) never exceeds
//!   the budget.
//!
//! Only [`put`](Store::put) and [`trim`](Store::trim) allocate or free
//! memory (a slab's); [`read`](Store::read) and [`free`](Store::free)
//! neither allocate nor free, so they may run in a signal handler (the
//! in-thread fault path and `page_free`).

use hmm::PAGE_SIZE;

/// The longest slab, in pages.
pub(crate) const SLAB_PAGES_MAX: usize = 4;
/// Size classes are this many bytes apart.
pub(crate) const CLASS_STEP: usize = 64;

const NIL: u32 = u32::MAX;
const NO_SLOT: u16 = u16::MAX;
const NO_CLASS: u16 = u16::MAX;

/// What the device holds for one of its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Record {
    /// Nothing (a free device page).
    Empty,
    /// A page of zeros: a flag, no memory.
    Zero,
    /// `len` compressed bytes in slot `slot` of slab `slab`.
    Stored { slab: u32, slot: u16, len: u16 },
}

#[derive(Debug)]
struct Slab {
    mem: Option<Box<[u8]>>,
    /// Pages of memory (while it has some).
    pages: u8,
    class: u16,
    used: u16,
    carved: u16,
    free_head: u16,
    prev: u32,
    next: u32,
}

#[derive(Debug)]
struct Class {
    size: usize,
    /// Pages of its slabs.
    pages: usize,
    slots: u16,
    partial: u32,
}

/// The store's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// Pages held compressed.
    pub stored_pages: u64,
    /// Pages held as the zero flag.
    pub zero_pages: u64,
    /// Their compressed bytes.
    pub compressed_bytes: u64,
    /// Bytes of the slabs in use (compressed bytes plus waste).
    pub footprint_bytes: u64,
    /// Bytes of every slab that has memory (in use or kept empty).
    pub held_bytes: u64,
}

/// What a page would not fit in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PutError {
    /// Longer than the largest class.
    TooLarge,
    /// No slot free and no slab left within the capacity.
    Full,
    /// No such device page.
    NoSuchPage,
}

/// Compressed pages by device page index (see the module docs).
#[derive(Debug)]
pub(crate) struct Store {
    slabs: Vec<Slab>,
    classes: Vec<Class>,
    records: Vec<Record>,
    fresh: u32,
    /// Empty slabs by their length in pages.
    empty: [u32; SLAB_PAGES_MAX + 1],
    empty_count: usize,
    budget: u64,
    usage: Usage,
}

impl Store {
    /// A store of at most `budget` bytes of slabs for `pages` device pages,
    /// whose largest class holds `max_len` bytes. All of its bookkeeping is
    /// allocated here; slab memory when first used.
    pub(crate) fn new(budget: usize, pages: usize, max_len: usize) -> Self {
        // At most one slab a page of the budget.
        let max_slabs = budget / PAGE_SIZE;
        let slabs = (0..max_slabs)
            .map(|i| Slab {
                mem: None,
                pages: 0,
                class: NO_CLASS,
                used: 0,
                carved: 0,
                free_head: NO_SLOT,
                prev: NIL,
                next: if i + 1 < max_slabs { (i + 1) as u32 } else { NIL },
            })
            .collect();
        let classes = (1..=max_len.div_ceil(CLASS_STEP))
            .map(|k| {
                let size = k * CLASS_STEP;
                // The slab length that wastes the least share of itself
                // (the waste of `p` pages over `p`, in twelfths: exact for
                // one to four pages).
                let pages = (1..=SLAB_PAGES_MAX)
                    .min_by_key(|p| ((p * PAGE_SIZE) % size) * (12 / p))
                    .expect("at least one length");
                Class { size, pages, slots: (pages * PAGE_SIZE / size) as u16, partial: NIL }
            })
            .collect();
        Self {
            slabs,
            classes,
            records: vec![Record::Empty; pages],
            fresh: if max_slabs > 0 { 0 } else { NIL },
            empty: [NIL; SLAB_PAGES_MAX + 1],
            empty_count: 0,
            budget: (max_slabs * PAGE_SIZE) as u64,
            usage: Usage::default(),
        }
    }

    /// The store's figures.
    pub(crate) fn usage(&self) -> Usage {
        self.usage
    }

    /// What device page `page` holds.
    pub(crate) fn record(&self, page: u32) -> Record {
        self.records.get(page as usize).copied().unwrap_or(Record::Empty)
    }

    /// Records device page `page` as zeros.
    pub(crate) fn put_zero(&mut self, page: u32) {
        self.free(page);
        if let Some(r) = self.records.get_mut(page as usize) {
            *r = Record::Zero;
            self.usage.zero_pages += 1;
        }
    }

    /// Stores `bytes` (a compressed page) for device page `page`.
    pub(crate) fn put(&mut self, page: u32, bytes: &[u8]) -> Result<(), PutError> {
        if page as usize >= self.records.len() {
            return Err(PutError::NoSuchPage);
        }
        let class = bytes.len().max(1).div_ceil(CLASS_STEP) - 1;
        if class >= self.classes.len() {
            return Err(PutError::TooLarge);
        }
        // What the page held goes first (its slot may be the one reused); a
        // page that then finds no room holds nothing. (The engine only puts
        // freshly allocated device pages.)
        self.free(page);
        let (slab, slot) = self.alloc(class)?;
        let size = self.classes[class].size;
        let mem = self.slabs[slab as usize].mem.as_mut().expect("a slab in use has memory");
        let at = slot as usize * size;
        mem[at..at + bytes.len()].copy_from_slice(bytes);
        self.records[page as usize] = Record::Stored { slab, slot, len: bytes.len() as u16 };
        self.usage.stored_pages += 1;
        self.usage.compressed_bytes += bytes.len() as u64;
        Ok(())
    }

    /// Copies the compressed bytes of device page `page` into `out` (at
    /// least as long as the largest class). Returns the record, whose
    /// `len` bytes of `out` are the page when it is `Stored`. Allocates
    /// nothing.
    pub(crate) fn read(&self, page: u32, out: &mut [u8]) -> Record {
        let r = self.record(page);
        if let Record::Stored { slab, slot, len } = r {
            let s = &self.slabs[slab as usize];
            let size = self.classes[s.class as usize].size;
            let mem = s.mem.as_ref().expect("a slab in use has memory");
            let at = slot as usize * size;
            let len = len as usize;
            if out.len() < len {
                return Record::Empty;
            }
            out[..len].copy_from_slice(&mem[at..at + len]);
        }
        r
    }

    /// Forgets what device page `page` holds. Allocates and frees nothing
    /// (a slab left empty keeps its memory until [`trim`](Self::trim)).
    pub(crate) fn free(&mut self, page: u32) {
        let Some(r) = self.records.get_mut(page as usize) else { return };
        let old = std::mem::replace(r, Record::Empty);
        match old {
            Record::Empty => {}
            Record::Zero => self.usage.zero_pages -= 1,
            Record::Stored { slab, slot, len } => {
                self.usage.stored_pages -= 1;
                self.usage.compressed_bytes -= u64::from(len);
                self.release(slab, slot);
            }
        }
    }

    /// Empty slabs holding memory.
    pub(crate) fn empty_slabs(&self) -> usize {
        self.empty_count
    }

    /// Gives back the memory of empty slabs beyond `keep` of them.
    pub(crate) fn trim(&mut self, keep: usize) {
        for pages in (1..=SLAB_PAGES_MAX).rev() {
            while self.empty_count > keep && self.empty[pages] != NIL {
                let s = self.empty[pages];
                self.drop_empty(s);
            }
        }
    }

    /// Gives back the memory of empty slab `s`.
    fn drop_empty(&mut self, s: u32) {
        self.unlink_empty(s);
        let slab = &mut self.slabs[s as usize];
        slab.mem = None;
        self.usage.held_bytes -= (slab.pages as usize * PAGE_SIZE) as u64;
        slab.pages = 0;
        slab.prev = NIL;
        slab.next = self.fresh;
        self.fresh = s;
    }

    fn alloc(&mut self, class: usize) -> Result<(u32, u16), PutError> {
        let mut s = self.classes[class].partial;
        if s == NIL {
            s = self.take_slab(class)?;
        }
        let slots = self.classes[class].slots;
        let size = self.classes[class].size;
        let slab = &mut self.slabs[s as usize];
        let slot = if slab.free_head != NO_SLOT {
            let slot = slab.free_head;
            let mem = slab.mem.as_ref().expect("a slab in use has memory");
            let at = slot as usize * size;
            slab.free_head = u16::from_ne_bytes([mem[at], mem[at + 1]]);
            slot
        } else {
            slab.carved += 1;
            slab.carved - 1
        };
        slab.used += 1;
        if slab.free_head == NO_SLOT && slab.carved == slots {
            self.unlink_partial(class, s);
        }
        Ok((s, slot))
    }

    /// An empty slab of the class's length (or a fresh one, given memory:
    /// empty slabs of other lengths give theirs back first where the budget
    /// needs it) for `class`, put on its partial list.
    fn take_slab(&mut self, class: usize) -> Result<u32, PutError> {
        let pages = self.classes[class].pages;
        let bytes = (pages * PAGE_SIZE) as u64;
        let s = if self.empty[pages] != NIL {
            let s = self.empty[pages];
            self.unlink_empty(s);
            s
        } else {
            while self.usage.held_bytes + bytes > self.budget {
                let Some(other) = (1..=SLAB_PAGES_MAX).map(|p| self.empty[p]).find(|s| *s != NIL)
                else {
                    return Err(PutError::Full);
                };
                self.drop_empty(other);
            }
            if self.fresh == NIL {
                return Err(PutError::Full);
            }
            let s = self.fresh;
            self.fresh = self.slabs[s as usize].next;
            self.slabs[s as usize].mem = Some(vec![0u8; pages * PAGE_SIZE].into_boxed_slice());
            self.slabs[s as usize].pages = pages as u8;
            self.usage.held_bytes += bytes;
            s
        };
        let slab = &mut self.slabs[s as usize];
        slab.class = class as u16;
        slab.used = 0;
        slab.carved = 0;
        slab.free_head = NO_SLOT;
        self.usage.footprint_bytes += bytes;
        self.link_partial(class, s);
        Ok(s)
    }

    fn release(&mut self, s: u32, slot: u16) {
        let class = self.slabs[s as usize].class as usize;
        let (size, slots) = (self.classes[class].size, self.classes[class].slots);
        let slab = &mut self.slabs[s as usize];
        let was_full = slab.free_head == NO_SLOT && slab.carved == slots;
        let at = slot as usize * size;
        let mem = slab.mem.as_mut().expect("a slab in use has memory");
        mem[at..at + 2].copy_from_slice(&slab.free_head.to_ne_bytes());
        slab.free_head = slot;
        slab.used -= 1;
        let now_empty = slab.used == 0;
        if was_full {
            self.link_partial(class, s);
        }
        if now_empty {
            self.unlink_partial(class, s);
            let slab = &mut self.slabs[s as usize];
            slab.class = NO_CLASS;
            let pages = slab.pages as usize;
            self.usage.footprint_bytes -= (pages * PAGE_SIZE) as u64;
            slab.prev = NIL;
            slab.next = self.empty[pages];
            if self.empty[pages] != NIL {
                self.slabs[self.empty[pages] as usize].prev = s;
            }
            self.empty[pages] = s;
            self.empty_count += 1;
        }
    }

    fn link_partial(&mut self, class: usize, s: u32) {
        let head = self.classes[class].partial;
        self.slabs[s as usize].prev = NIL;
        self.slabs[s as usize].next = head;
        if head != NIL {
            self.slabs[head as usize].prev = s;
        }
        self.classes[class].partial = s;
    }

    fn unlink_partial(&mut self, class: usize, s: u32) {
        let (prev, next) = (self.slabs[s as usize].prev, self.slabs[s as usize].next);
        match prev {
            NIL => self.classes[class].partial = next,
            p => self.slabs[p as usize].next = next,
        }
        if next != NIL {
            self.slabs[next as usize].prev = prev;
        }
        self.slabs[s as usize].prev = NIL;
        self.slabs[s as usize].next = NIL;
    }

    fn unlink_empty(&mut self, s: u32) {
        let (prev, next) = (self.slabs[s as usize].prev, self.slabs[s as usize].next);
        let pages = self.slabs[s as usize].pages as usize;
        match prev {
            NIL => self.empty[pages] = next,
            p => self.slabs[p as usize].next = next,
        }
        if next != NIL {
            self.slabs[next as usize].prev = prev;
        }
        self.slabs[s as usize].prev = NIL;
        self.slabs[s as usize].next = NIL;
        self.empty_count -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    fn stored(s: &Store, page: u32) -> Vec<u8> {
        let mut out = vec![0u8; 4096];
        match s.read(page, &mut out) {
            Record::Stored { len, .. } => out[..len as usize].to_vec(),
            r => panic!("page {page}: {r:?}"),
        }
    }

    #[test]
    fn pages_come_back_as_stored_and_slots_are_reused() {
        let mut s = Store::new(64 * PAGE_SIZE, 64, 3000);
        s.put(0, &bytes(100, 1)).unwrap();
        s.put(1, &bytes(100, 2)).unwrap();
        s.put(2, &bytes(2990, 3)).unwrap();
        assert_eq!(stored(&s, 0), bytes(100, 1));
        assert_eq!(stored(&s, 1), bytes(100, 2));
        assert_eq!(stored(&s, 2), bytes(2990, 3));
        let u = s.usage();
        assert_eq!((u.stored_pages, u.compressed_bytes), (3, 3190));
        // Two classes in use: a slab of each.
        let slab = |len: usize| (s.classes[len.div_ceil(CLASS_STEP) - 1].pages * PAGE_SIZE) as u64;
        assert_eq!(u.footprint_bytes, slab(100) + slab(2990));
        // A freed slot is the next one taken in its class.
        let Record::Stored { slot: freed, .. } = s.record(0) else { unreachable!() };
        s.free(0);
        s.put(5, &bytes(70, 9)).unwrap();
        assert!(matches!(s.record(5), Record::Stored { slot, .. } if slot == freed));
        assert_eq!(stored(&s, 5), bytes(70, 9));
        assert_eq!(stored(&s, 1), bytes(100, 2), "a neighbour's bytes are untouched");
    }

    #[test]
    fn classes_take_the_slab_length_that_wastes_least() {
        let s = Store::new(1 << 20, 8, 4096);
        for c in &s.classes {
            let bytes = c.pages * PAGE_SIZE;
            let waste = (bytes - c.slots as usize * c.size) as f64 / bytes as f64;
            let best = (1..=SLAB_PAGES_MAX)
                .map(|p| ((p * PAGE_SIZE) % c.size) as f64 / (p * PAGE_SIZE) as f64)
                .fold(f64::MAX, f64::min);
            assert!((waste - best).abs() < 1e-9, "class {}: {} pages", c.size, c.pages);
        }
        // 3008 bytes: three pages hold four slots (waste 256 of 12288).
        let c = &s.classes[3008 / CLASS_STEP - 1];
        assert_eq!((c.pages, c.slots), (3, 4));
    }

    #[test]
    fn the_budget_bounds_the_slabs_and_empty_slabs_are_reused_then_trimmed() {
        // Three pages: one slab of the 3008-byte class, four slots.
        let mut s = Store::new(3 * PAGE_SIZE, 64, 3000);
        for p in 0..4 {
            s.put(p, &bytes(3000, p as u8)).unwrap();
        }
        assert_eq!(s.put(5, &bytes(3000, 0)), Err(PutError::Full));
        // A smaller class needs a slab of its own: no budget left.
        assert_eq!(s.put(5, &bytes(10, 0)), Err(PutError::Full));
        for p in 0..4 {
            s.free(p);
        }
        let u = s.usage();
        assert_eq!(
            (u.footprint_bytes, u.held_bytes),
            (0, 3 * PAGE_SIZE as u64),
            "kept, not in use"
        );
        // Another length of slab: the empty one gives its memory back first.
        s.put(3, &bytes(10, 7)).unwrap();
        assert_eq!(stored(&s, 3), bytes(10, 7));
        assert!(s.usage().held_bytes <= 3 * PAGE_SIZE as u64);
        s.free(3);
        s.trim(0);
        assert_eq!(s.usage().held_bytes, 0, "trimmed");
        s.put(4, &bytes(3000, 8)).unwrap();
        assert_eq!(stored(&s, 4), bytes(3000, 8), "a trimmed slab is given memory again");
    }

    #[test]
    fn zero_pages_take_no_memory_and_too_large_pages_are_refused() {
        let mut s = Store::new(8 * PAGE_SIZE, 8, 2990);
        s.put_zero(1);
        assert_eq!(s.record(1), Record::Zero);
        assert_eq!(s.usage().footprint_bytes, 0);
        assert_eq!(s.usage().zero_pages, 1);
        assert_eq!(s.put(2, &bytes(3100, 0)), Err(PutError::TooLarge));
        assert_eq!(s.put(99, &bytes(10, 0)), Err(PutError::NoSuchPage));
        // Overwriting a page frees what it held.
        s.put(1, &bytes(10, 1)).unwrap();
        assert_eq!(s.usage().zero_pages, 0);
        s.put(1, &bytes(20, 2)).unwrap();
        assert_eq!((s.usage().stored_pages, s.usage().compressed_bytes), (1, 20));
    }

    /// Many pages in random order, freed in another order: every page reads
    /// back what was stored, and the figures return to zero.
    #[test]
    fn a_churn_of_pages_keeps_every_page_and_the_figures_exact() {
        let pages = 2000u32;
        let mut s = Store::new(1 << 20, pages as usize, 2990);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut want: Vec<Option<Vec<u8>>> = vec![None; pages as usize];
        for _ in 0..20_000 {
            let p = (next() % u64::from(pages)) as u32;
            if next() % 3 == 0 {
                s.free(p);
                want[p as usize] = None;
            } else {
                let b = bytes(1 + (next() % 2990) as usize, next() as u8);
                match s.put(p, &b) {
                    Ok(()) => want[p as usize] = Some(b),
                    Err(PutError::Full) => want[p as usize] = None,
                    Err(e) => panic!("{e:?}"),
                }
            }
        }
        let mut total = 0;
        for (p, w) in want.iter().enumerate() {
            match w {
                Some(b) => {
                    assert_eq!(&stored(&s, p as u32), b, "page {p}");
                    total += b.len() as u64;
                }
                None => assert_eq!(s.record(p as u32), Record::Empty, "page {p}"),
            }
        }
        assert_eq!(s.usage().compressed_bytes, total);
        assert!(s.usage().footprint_bytes >= total);
        for p in 0..pages {
            s.free(p);
        }
        let u = s.usage();
        assert_eq!((u.stored_pages, u.compressed_bytes, u.footprint_bytes), (0, 0, 0));
    }
}
