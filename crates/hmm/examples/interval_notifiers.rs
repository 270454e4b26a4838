//! Mirroring with interval notifiers: a device driver keeps its own copy of
//! translations for a range and must drop them before the CPU side changes.
//!
//! The protocol is the kernel's `mmu_interval_notifier`: read the sequence,
//! look the pages up (`range_fault`), then take the driver's lock and check
//! the sequence again before using what was looked up; the notifier's
//! callback takes the same lock to invalidate. Here the "device page table"
//! is a map from address to what `range_fault` said.
//!
//! Run with `cargo run --example interval_notifiers`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use hmm::{Hmm, PAGE_SIZE, RangeFault, VirtAddr};

/// A toy device page table: address to "readable, writable".
type Table = Arc<Mutex<BTreeMap<usize, (bool, bool)>>>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let hmm = Hmm::new()?;
    let r = hmm.alloc(8 * PAGE_SIZE)?;
    r.fill(0, r.len(), 1)?;

    let table: Table = Arc::default();
    let events = Arc::new(Mutex::new(Vec::new()));
    let (t, log) = (table.clone(), events.clone());
    let notifier = hmm.insert_notifier(r.range(), move |inv| {
        // Called before the change takes effect: drop every translation of
        // the range, under the driver's lock.
        let mut t = t.lock().unwrap();
        let (a, b) = (inv.range.start().get(), inv.range.end().get());
        t.retain(|addr, _| *addr < a || *addr >= b);
        log.lock().unwrap().push(format!("{:?} of {}", inv.event, inv.range));
    });

    // Fill the table with the retry loop.
    let fill = || -> Result<(), Box<dyn std::error::Error>> {
        loop {
            let seq = notifier.read_begin();
            // Fault readable pages in; report writability as it is.
            let pages = hmm.range_fault(&RangeFault::fault(r.range(), false, None))?;
            let mut t = table.lock().unwrap();
            if notifier.read_retry(seq) {
                continue; // an invalidation came in between: look again
            }
            for (k, p) in pages.iter().enumerate() {
                t.insert(r.addr().get() + k * PAGE_SIZE, (p.valid, p.write));
            }
            return Ok(());
        }
    };
    fill()?;
    println!("mirrored {} pages", table.lock().unwrap().len());

    // The CPU side changes: the protection of two pages, then a discard.
    r.protect(r.pages_range(0, 2)?, hmm::os::mm::Protection::Read)?;
    r.advise(r.pages_range(4, 2)?, hmm::os::mm::Advise::DontNeed)?;
    println!("after the changes the table holds {} pages", table.lock().unwrap().len());
    for e in events.lock().unwrap().iter() {
        println!("  invalidated: {e}");
    }
    assert!(table.lock().unwrap().len() < 8, "the changes dropped translations");

    // Mirror again: the read-only pages now say so.
    fill()?;
    let t = table.lock().unwrap();
    assert_eq!(t[&r.addr().get()], (true, false), "page 0 is read-only now");
    println!("page 0 at {}: readable, not writable", VirtAddr::new(r.addr().get()));
    Ok(())
}
