//! Writing a device driver for hmm: a "device" whose memory is compressed
//! system memory, the kind of far-memory tier hmm can manage like an
//! accelerator's memory.
//!
//! A driver gives hmm two things:
//! - [`DevicePagemapOps`]: the callbacks of its memory region (a page is
//!   freed; which engine copies; optionally how a CPU fault brings pages
//!   back, which defaults to the engine);
//! - a [`DmaEngine`]: copies batches of pages into device pages
//!   (`ToDevice`) and out of them into managed addresses (`ToSystem`, through
//!   the sink hmm hands it, which installs pages atomically with
//!   `UFFDIO_COPY`).
//!
//! hmm does the rest: it picks the pages, unmaps them while they move,
//! records where each lives, and when the CPU touches one, asks this driver
//! to bring it back before the touch completes.
//!
//! Run with `cargo run --example compressed_memory_driver`.

use std::sync::{Arc, Mutex};

use hmm::dma::{DmaJob, SystemSink, ToDevice, ToSystem};
use hmm::os::mm::{Mapping, Protection};
use hmm::{
    DeviceMemoryConfig, DevicePage, DevicePagemapOps, DmaEngine, DmaError, DmaFence, Hmm,
    PAGE_SIZE, Residency,
};

/// A page as the device keeps it.
enum Stored {
    /// All zeros: takes no memory.
    Zero,
    /// Runs of equal bytes as `(length - 1, byte)` pairs.
    Runs(Vec<u8>),
    /// As it was (runs would not have been smaller).
    Raw(Box<[u8]>),
}

fn compress(page: &[u8]) -> Stored {
    if page.iter().all(|b| *b == 0) {
        return Stored::Zero;
    }
    let mut runs = Vec::new();
    for chunk in page.chunk_by(|a, b| a == b) {
        for part in chunk.chunks(256) {
            runs.extend_from_slice(&[(part.len() - 1) as u8, part[0]]);
        }
        if runs.len() >= PAGE_SIZE {
            return Stored::Raw(page.into());
        }
    }
    Stored::Runs(runs)
}

fn decompress(s: &Stored, out: &mut [u8]) {
    match s {
        Stored::Zero => out.fill(0),
        Stored::Raw(b) => out.copy_from_slice(b),
        Stored::Runs(r) => {
            let mut at = 0;
            for pair in r.chunks_exact(2) {
                let n = usize::from(pair[0]) + 1;
                out[at..at + n].fill(pair[1]);
                at += n;
            }
        }
    }
}

/// The driver: its pages, indexed by device page number.
struct Zmem {
    pages: Mutex<Vec<Option<Stored>>>,
}

impl Zmem {
    fn new(pages: usize) -> Self {
        Self { pages: Mutex::new((0..pages).map(|_| None).collect()) }
    }

    /// Bytes the stored pages take.
    fn stored_bytes(&self) -> usize {
        let pages = self.pages.lock().unwrap();
        pages
            .iter()
            .flatten()
            .map(|s| match s {
                Stored::Zero => 0,
                Stored::Runs(r) => r.len(),
                Stored::Raw(b) => b.len(),
            })
            .sum()
    }

    fn to_device(&self, copies: &[ToDevice]) -> Vec<Result<(), DmaError>> {
        let mut buf = vec![0u8; PAGE_SIZE];
        let mut pages = self.pages.lock().unwrap();
        copies
            .iter()
            .map(|c| {
                let stored = match c.src.bytes() {
                    None => Stored::Zero,
                    Some((mapping, offset)) => {
                        mapping
                            .read(offset, &mut buf)
                            .map_err(|e| DmaError::Failed(e.to_string()))?;
                        compress(&buf)
                    }
                };
                pages[c.dst.index as usize] = Some(stored);
                Ok(())
            })
            .collect()
    }

    fn to_system(&self, copies: &[ToSystem], sink: &SystemSink) -> Vec<Result<(), DmaError>> {
        // Pages are installed from a bounce page: the kernel copies it into
        // place atomically, so no thread ever sees a half-written page.
        let bounce = match Mapping::anonymous(PAGE_SIZE, Protection::ReadWrite) {
            Ok(b) => b,
            Err(_) => return vec![Err(DmaError::NoMemory); copies.len()],
        };
        let mut buf = vec![0u8; PAGE_SIZE];
        let pages = self.pages.lock().unwrap();
        copies
            .iter()
            .map(|c| match &pages[c.src.index as usize] {
                None => Err(DmaError::Failed(format!("device page {} holds nothing", c.src))),
                Some(Stored::Zero) => sink.install_zero(c.dst, 1).remove(0),
                Some(s) => {
                    decompress(s, &mut buf);
                    bounce.write(0, &buf).map_err(|e| DmaError::Failed(e.to_string()))?;
                    sink.install_copy(c.dst, &bounce, 0, 1).remove(0)
                }
            })
            .collect()
    }
}

impl DmaEngine for Zmem {
    fn name(&self) -> &str {
        "compressing copy"
    }

    fn submit(&self, job: DmaJob) -> DmaFence {
        // A synchronous engine: every copy is done before the fence is
        // returned. A real engine would queue the work and complete the
        // fence from its interrupt handler.
        let (fence, done) = DmaFence::new(job.len());
        let results = match &job {
            DmaJob::ToDevice(copies) => self.to_device(copies),
            DmaJob::ToSystem { copies, sink } => self.to_system(copies, sink),
        };
        done.complete(0, results);
        fence
    }
}

impl DevicePagemapOps for Zmem {
    fn page_free(&self, page: DevicePage) {
        self.pages.lock().unwrap()[page.index as usize] = None;
    }

    fn dma(&self) -> &dyn DmaEngine {
        self
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let hmm = Hmm::new()?;
    const CAPACITY: usize = 64 << 20;
    let zmem = Arc::new(Zmem::new(CAPACITY / PAGE_SIZE));
    let mem =
        hmm.register_device_memory(DeviceMemoryConfig::private("zmem", CAPACITY), zmem.clone())?;

    // 4 MiB of cold data: a sparse table, mostly zeros and repeated bytes.
    let r = hmm.alloc(4 << 20)?;
    for k in (0..r.len()).step_by(64 << 10) {
        r.write(k, format!("record {k:08}").as_bytes())?;
    }
    r.fill(PAGE_SIZE * 100, PAGE_SIZE * 4, 0xEE)?;

    let rep = hmm.migrate_to_device(r.range(), &mem, &*zmem)?;
    println!(
        "moved {} pages ({} KiB) into compressed memory, which holds them in {} bytes",
        rep.migrated,
        r.len() >> 10,
        zmem.stored_bytes()
    );
    assert!(matches!(r.residency(1), Residency::Device(_)));

    // The CPU reads a record: hmm asks the driver for the page back.
    let mut buf = [0u8; 15];
    r.read(128 << 10, &mut buf)?;
    println!("the CPU reads {:?} at 128 KiB", String::from_utf8_lossy(&buf));
    assert_eq!(&buf, b"record 00131072");
    assert_eq!(r.residency((128 << 10) / PAGE_SIZE), Residency::System);

    // Everything back, every byte checked. (The rest of the read page's
    // fault-around window comes back after the read returned: settle first,
    // so that no page of it is still on its way when the migration looks.)
    hmm.settle(std::time::Duration::from_secs(10))?;
    hmm.migrate_to_system(r.range(), &mem, &*zmem)?;
    let mut page = vec![0u8; PAGE_SIZE];
    r.read(PAGE_SIZE * 101, &mut page)?;
    assert!(page.iter().all(|b| *b == 0xEE));
    println!(
        "all pages back in system memory; device pages in use: {}",
        mem.stats().pages_resident
    );
    assert_eq!(mem.stats().pages_resident, 0);
    hmm.unregister_device_memory(&mem)?;
    Ok(())
}
