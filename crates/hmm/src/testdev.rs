//! A minimal device for the library's own unit tests: its memory is a
//! vector of pages, its engine copies synchronously. (The full software
//! device is the `hmm-swdev` crate, on the public driver API; the library's
//! unit tests cannot depend on it.)

use std::sync::{Arc, Mutex};

use crate::addr::{PAGE_SIZE, PageRange};
use crate::devmem::{DeviceMemory, DeviceMemoryConfig, DevicePagemapOps};
use crate::dma::{DmaEngine, DmaError, DmaFence, DmaJob, SystemSink, ToDevice, ToSystem};
use crate::migrate::MigrationReport;
use crate::os::mm::{Mapping, Protection};
use crate::page::DevicePage;
use crate::space::{Hmm, HmmError};

/// The device's pages, by device page index.
struct Pages(Mutex<Vec<Option<Box<[u8]>>>>);

impl Pages {
    fn to_device(&self, copies: &[ToDevice]) -> Vec<Result<(), DmaError>> {
        let mut pages = self.0.lock().unwrap();
        copies
            .iter()
            .map(|c| {
                let mut page = vec![0u8; PAGE_SIZE].into_boxed_slice();
                if let Some((m, off)) = c.src.bytes() {
                    m.read(off, &mut page).map_err(|e| DmaError::Failed(e.to_string()))?;
                }
                pages[c.dst.index as usize] = Some(page);
                Ok(())
            })
            .collect()
    }

    fn to_system(&self, copies: &[ToSystem], sink: &SystemSink) -> Vec<Result<(), DmaError>> {
        let Ok(bounce) = Mapping::anonymous(PAGE_SIZE, Protection::ReadWrite) else {
            return vec![Err(DmaError::NoMemory); copies.len()];
        };
        let pages = self.0.lock().unwrap();
        copies
            .iter()
            .map(|c| {
                let page = pages[c.src.index as usize].as_ref().ok_or(DmaError::DeviceFailed)?;
                bounce.write(0, page).map_err(|e| DmaError::Failed(e.to_string()))?;
                sink.install_copy(c.dst, &bounce, 0, 1).remove(0)
            })
            .collect()
    }
}

impl DmaEngine for Pages {
    fn name(&self) -> &str {
        "test copy"
    }

    fn submit(&self, job: DmaJob) -> DmaFence {
        let (fence, done) = DmaFence::new(job.len());
        let results = match &job {
            DmaJob::ToDevice(copies) => self.to_device(copies),
            DmaJob::ToSystem { copies, sink } => self.to_system(copies, sink),
        };
        done.complete(0, results);
        fence
    }
}

impl DevicePagemapOps for Pages {
    fn page_free(&self, page: DevicePage) {
        self.0.lock().unwrap()[page.index as usize] = None;
    }

    fn dma(&self) -> &dyn DmaEngine {
        self
    }
}

/// A registered test device of `pages` pages.
pub(crate) struct TestDevice<'h> {
    hmm: &'h Hmm,
    mem: Arc<DeviceMemory>,
}

/// The callbacks and configuration of a test device of `pages` pages, for
/// tests that register it themselves.
pub(crate) fn parts(pages: usize) -> (DeviceMemoryConfig, Arc<dyn DevicePagemapOps>) {
    let ops = Arc::new(Pages(Mutex::new((0..pages).map(|_| None).collect())));
    (DeviceMemoryConfig::private("test", pages * PAGE_SIZE), ops)
}

impl<'h> TestDevice<'h> {
    pub(crate) fn new(hmm: &'h Hmm, pages: usize) -> Self {
        let (config, ops) = parts(pages);
        let mem = hmm.register_device_memory(config, ops).unwrap();
        Self { hmm, mem }
    }

    pub(crate) fn migrate_to_device(&self, range: PageRange) -> Result<MigrationReport, HmmError> {
        self.hmm.migrate_to_device(range, &self.mem, self.mem.ops().dma())
    }

    /// Marks the device failed: returns the pages lost.
    pub(crate) fn fail(&self) -> usize {
        self.hmm.device_failed(&self.mem)
    }
}
