//! Where compressed pages live: slabs carved into slots by size class.
//!
//! A compressed page of `len` bytes takes a slot of the smallest class that
//! holds it (classes every [`CLASS_STEP`] bytes, up to the device's
//! threshold), in a slab of [`SLAB_BYTES`] given to that class. So the
//! device's memory is counted in what it really holds: its footprint is
//! the slabs in use, the compressed bytes plus the allocator's waste (the
//! rounding up to a class, and the free slots of partly used slabs).
//!
//! # Invariants
//!
//! - A slab is in exactly one state: *fresh* (no memory, on `fresh`),
//!   *empty* (memory, no class, on `empty`), or *in use* by one class
//!   (`class != NO_CLASS`); an in-use slab that is not full is on its
//!   class's `partial` list. The lists are threaded through the slabs
//!   themselves (`prev`/`next`), so moving a slab between them allocates
//!   nothing.
//! - Slots of an in-use slab are carved on demand (`carved`); freed slots
//!   form a list threaded through their own first two bytes (`free_head`).
//! - Every record `Stored { slab, slot, len }` names a slot in use, and
//!   `used` counts them per slab.
//!
//! Only [`put`](Store::put) and [`trim`](Store::trim) allocate or free
//! memory (a slab's); [`read`](Store::read) and [`free`](Store::free)
//! neither allocate nor free, so they may run in a signal handler (the
//! in-thread fault path and `page_free`).

/// Bytes of one slab.
pub(crate) const SLAB_BYTES: usize = 64 << 10;
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
    empty: u32,
    empty_count: usize,
    usage: Usage,
}

impl Store {
    /// A store of `max_slabs` slabs for `pages` device pages, whose
    /// largest class holds `max_len` bytes. All of its bookkeeping is
    /// allocated here; slab memory when first used.
    pub(crate) fn new(max_slabs: usize, pages: usize, max_len: usize) -> Self {
        let slabs = (0..max_slabs)
            .map(|i| Slab {
                mem: None,
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
                Class { size, slots: (SLAB_BYTES / size) as u16, partial: NIL }
            })
            .collect();
        Self {
            slabs,
            classes,
            records: vec![Record::Empty; pages],
            fresh: if max_slabs > 0 { 0 } else { NIL },
            empty: NIL,
            empty_count: 0,
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
        self.free(page);
        let class = bytes.len().max(1).div_ceil(CLASS_STEP) - 1;
        if class >= self.classes.len() {
            return Err(PutError::TooLarge);
        }
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

    /// Gives back the memory of empty slabs beyond `keep` of them.
    pub(crate) fn trim(&mut self, keep: usize) {
        while self.empty_count > keep && self.empty != NIL {
            let s = self.empty;
            self.unlink_empty(s);
            let slab = &mut self.slabs[s as usize];
            slab.mem = None;
            self.usage.held_bytes -= SLAB_BYTES as u64;
            slab.prev = NIL;
            slab.next = self.fresh;
            self.fresh = s;
        }
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

    /// An empty slab (or a fresh one, given memory) for `class`, put on
    /// its partial list.
    fn take_slab(&mut self, class: usize) -> Result<u32, PutError> {
        let s = if self.empty != NIL {
            let s = self.empty;
            self.unlink_empty(s);
            s
        } else if self.fresh != NIL {
            let s = self.fresh;
            self.fresh = self.slabs[s as usize].next;
            self.slabs[s as usize].mem = Some(vec![0u8; SLAB_BYTES].into_boxed_slice());
            self.usage.held_bytes += SLAB_BYTES as u64;
            s
        } else {
            return Err(PutError::Full);
        };
        let slab = &mut self.slabs[s as usize];
        slab.class = class as u16;
        slab.used = 0;
        slab.carved = 0;
        slab.free_head = NO_SLOT;
        self.usage.footprint_bytes += SLAB_BYTES as u64;
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
            self.usage.footprint_bytes -= SLAB_BYTES as u64;
            slab.prev = NIL;
            slab.next = self.empty;
            if self.empty != NIL {
                self.slabs[self.empty as usize].prev = s;
            }
            self.empty = s;
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
        match prev {
            NIL => self.empty = next,
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
        let mut s = Store::new(4, 64, 3000);
        s.put(0, &bytes(100, 1)).unwrap();
        s.put(1, &bytes(100, 2)).unwrap();
        s.put(2, &bytes(2990, 3)).unwrap();
        assert_eq!(stored(&s, 0), bytes(100, 1));
        assert_eq!(stored(&s, 1), bytes(100, 2));
        assert_eq!(stored(&s, 2), bytes(2990, 3));
        let u = s.usage();
        assert_eq!((u.stored_pages, u.compressed_bytes), (3, 3190));
        // Two classes in use: two slabs.
        assert_eq!(u.footprint_bytes, 2 * SLAB_BYTES as u64);
        // A freed slot is the next one taken in its class.
        let Record::Stored { slot: freed, .. } = s.record(0) else { unreachable!() };
        s.free(0);
        s.put(5, &bytes(70, 9)).unwrap();
        assert!(matches!(s.record(5), Record::Stored { slot, .. } if slot == freed));
        assert_eq!(stored(&s, 5), bytes(70, 9));
        assert_eq!(stored(&s, 1), bytes(100, 2), "a neighbour's bytes are untouched");
    }

    #[test]
    fn capacity_is_counted_in_slabs_and_empty_slabs_are_reused_then_trimmed() {
        // One slab of the largest class holds SLAB_BYTES / 3008 = 21 pages.
        let mut s = Store::new(1, 64, 3000);
        for p in 0..21 {
            s.put(p, &bytes(3000, p as u8)).unwrap();
        }
        assert_eq!(s.put(21, &bytes(3000, 0)), Err(PutError::Full));
        // A smaller class needs a slab of its own: full too.
        assert_eq!(s.put(21, &bytes(10, 0)), Err(PutError::Full));
        for p in 0..21 {
            s.free(p);
        }
        let u = s.usage();
        assert_eq!((u.footprint_bytes, u.held_bytes), (0, SLAB_BYTES as u64), "kept, not in use");
        // The empty slab serves another class.
        s.put(3, &bytes(10, 7)).unwrap();
        assert_eq!(stored(&s, 3), bytes(10, 7));
        s.free(3);
        s.trim(0);
        assert_eq!(s.usage().held_bytes, 0, "trimmed");
        s.put(4, &bytes(10, 8)).unwrap();
        assert_eq!(stored(&s, 4), bytes(10, 8), "a trimmed slab is given memory again");
    }

    #[test]
    fn zero_pages_take_no_memory_and_too_large_pages_are_refused() {
        let mut s = Store::new(2, 8, 2990);
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
        let mut s = Store::new(64, pages as usize, 2990);
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
