//! The kernel's own answer to far memory, as an anchor: a random swap-in
//! from a compressed RAM disk (zram, lz4) of pages `MADV_PAGEOUT` pushed out.
//!
//! Measuring it changes the machine's swap configuration, so it runs only
//! when asked (`hmm bench --zram`) and as root, on a zram device of its own
//! (hot-added, never one already in use), swapped on at the highest
//! priority so the pages go there, and torn down (swap off, reset, removed)
//! when the measurement ends, whether it succeeded or not. Anything missing
//! (not root, no zram, no `mkswap`) skips it with the reason.

use std::path::PathBuf;
use std::process::Command;

use hmm::addr::PAGE_SIZE;
use hmm::os::mm::{Advise, Mapping, Protection};
use hmm::os::pagemap::Pagemap;

/// Why the anchor was not measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped(pub String);

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn skip(why: impl Into<String>) -> Skipped {
    Skipped(why.into())
}

/// A zram device this run added, removed again on drop (swap off first).
struct Device {
    id: u32,
    swapped_on: bool,
}

impl Device {
    fn sys(&self, file: &str) -> PathBuf {
        PathBuf::from(format!("/sys/block/zram{}/{file}", self.id))
    }

    fn node(&self) -> String {
        format!("/dev/zram{}", self.id)
    }

    /// Adds a new zram device of `bytes`, compressing with lz4 where the
    /// kernel offers it; returns it and the algorithm in use.
    fn add(bytes: usize) -> Result<(Device, String), Skipped> {
        let id = std::fs::read_to_string("/sys/class/zram-control/hot_add")
            .map_err(|e| skip(format!("cannot add a zram device (is zram built in?): {e}")))?;
        let id: u32 = id
            .trim()
            .parse()
            .map_err(|_| skip(format!("zram hot_add said {id:?}, not a number")))?;
        let dev = Device { id, swapped_on: false };
        let algos = std::fs::read_to_string(dev.sys("comp_algorithm")).unwrap_or_default();
        if algos.split_whitespace().any(|a| a.trim_matches(['[', ']']) == "lz4") {
            std::fs::write(dev.sys("comp_algorithm"), "lz4")
                .map_err(|e| skip(format!("cannot choose lz4 for zram{id}: {e}")))?;
        }
        let algo = std::fs::read_to_string(dev.sys("comp_algorithm"))
            .unwrap_or_default()
            .split_whitespace()
            .find(|a| a.starts_with('['))
            .map(|a| a.trim_matches(['[', ']']).to_string())
            .unwrap_or_else(|| "unknown".into());
        std::fs::write(dev.sys("disksize"), bytes.to_string())
            .map_err(|e| skip(format!("cannot size zram{id}: {e}")))?;
        Ok((dev, algo))
    }

    fn swap_on(&mut self) -> Result<(), Skipped> {
        run("mkswap", &[&self.node()])?;
        // The highest priority: the pages paged out go here, not to a swap
        // device the machine already has.
        run("swapon", &["-p", "32767", &self.node()])?;
        self.swapped_on = true;
        Ok(())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if self.swapped_on && run("swapoff", &[&self.node()]).is_err() {
            eprintln!("hmm bench: could not swap off {}: remove it by hand", self.node());
            return;
        }
        let _ = std::fs::write(self.sys("reset"), "1");
        if std::fs::write("/sys/class/zram-control/hot_remove", self.id.to_string()).is_err() {
            eprintln!("hmm bench: could not remove zram{} (reset, but still listed)", self.id);
        }
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), Skipped> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| skip(format!("cannot run {program}: {e}")))?;
    if !out.status.success() {
        return Err(skip(format!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Whether the anchor can be measured here (`hmm bench --zram`), without
/// changing anything: root, zram's control files, `mkswap` and `swapon`.
pub fn available() -> Result<(), Skipped> {
    if !hmm::os::process::is_root() {
        return Err(skip("it changes the swap configuration: run as root"));
    }
    if !std::path::Path::new("/sys/class/zram-control/hot_add").exists() {
        return Err(skip(
            "no /sys/class/zram-control (zram not built in, nor its module loaded: modprobe zram)",
        ));
    }
    for program in ["mkswap", "swapon", "swapoff"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()));
        if !found {
            return Err(skip(format!("{program} is not on PATH (util-linux)")));
        }
    }
    Ok(())
}

/// Fills `page` with the anchor's data: a quarter of random words (from
/// `x`), repeated over the rest, about 4:1 compressible as program data
/// often is. The compressed tier's figures use the same data.
pub(crate) fn anchor_page(x: &mut u64, page: &mut [u8]) {
    for chunk in page[..PAGE_SIZE / 4].chunks_mut(8) {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        chunk.copy_from_slice(&x.to_ne_bytes()[..chunk.len()]);
    }
    let (head, tail) = page.split_at_mut(PAGE_SIZE / 4);
    for c in tail.chunks_mut(PAGE_SIZE / 4) {
        c.copy_from_slice(&head[..c.len()]);
    }
}

/// The anchor's figures.
#[derive(Debug, Clone)]
pub struct Anchor {
    /// Random swap-in, median, microseconds.
    pub p50: f64,
    /// The same, 99th percentile.
    pub p99: f64,
    /// Every page paged out again, then touched in order: GB/s.
    pub sequential_gbps: f64,
    /// The compression algorithm.
    pub algorithm: String,
}

/// What a swap-in from zram costs: random touches of `pages` pages of
/// compressible data (about 4:1, as program data often is) that `MADV_PAGEOUT` put on a zram
/// device of the run's own (the median and the 99th percentile, over the
/// touches of pages that were out), then the same pages paged out again
/// and touched in order.
pub fn swapin(pages: usize) -> Result<Anchor, Skipped> {
    if !hmm::os::process::is_root() {
        return Err(skip("the zram anchor changes the swap configuration: run as root"));
    }
    let len = pages * PAGE_SIZE;
    let (mut dev, algo) = Device::add(len * 2)?;
    dev.swap_on()?;
    let m = Mapping::anonymous(len, Protection::ReadWrite)
        .map_err(|e| skip(format!("cannot map {len} bytes: {e}")))?;
    // 4 KiB pages: a transparent huge page would go out and come back whole.
    m.advise(m.range(), Advise::NoHugePage)
        .map_err(|e| skip(format!("MADV_NOHUGEPAGE failed: {e}")))?;
    let mut page = vec![0u8; PAGE_SIZE];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for p in 0..pages {
        anchor_page(&mut x, &mut page);
        m.write(p * PAGE_SIZE, &page).map_err(|e| skip(format!("cannot fill the pages: {e}")))?;
    }
    m.advise(m.range(), Advise::PageOut).map_err(|e| skip(format!("MADV_PAGEOUT failed: {e}")))?;
    let pm = Pagemap::open().map_err(|e| skip(format!("cannot read the page table: {e}")))?;
    let entries =
        pm.entries(m.range()).map_err(|e| skip(format!("cannot read the page table: {e}")))?;
    let out: Vec<usize> =
        entries.iter().enumerate().filter(|(_, e)| e.swapped()).map(|(i, _)| i).collect();
    if out.len() < pages / 2 {
        return Err(skip(format!(
            "MADV_PAGEOUT put only {} of {pages} pages out to zram",
            out.len()
        )));
    }
    let order = super::shuffled(out, x);
    let (p50, p99) = super::touch_latency_us(&m, &order, |_| true)
        .map_err(|e| skip(format!("a touch failed: {e}")))?;
    // In order: the kernel's swap readahead does what it can.
    m.advise(m.range(), Advise::PageOut).map_err(|e| skip(format!("MADV_PAGEOUT failed: {e}")))?;
    let t = std::time::Instant::now();
    let mut sum = 0u64;
    for p in 0..pages {
        sum += u64::from(
            m.touch_read(p * PAGE_SIZE).map_err(|e| skip(format!("a touch failed: {e}")))?,
        );
    }
    let sequential_gbps = super::gbps(len, t.elapsed());
    std::hint::black_box(sum);
    drop(m);
    drop(dev);
    Ok(Anchor { p50, p99, sequential_gbps, algorithm: algo })
}
