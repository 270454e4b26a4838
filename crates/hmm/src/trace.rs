//! A timeline of what hmm does: migrations, CPU faults, device faults and
//! invalidations, recorded while [`start`] is in effect and written as a
//! Chrome trace (the JSON that `chrome://tracing` and Perfetto open).
//!
//! Off (the default), recording costs one relaxed atomic load per site: the
//! [`span`] that would record returns `None` and nothing else happens. On,
//! each span takes two clock reads and, when it ends, one short lock to
//! append its event. At most [`MAX_EVENTS`] events are kept; the rest are
//! counted, and the written trace says how many were dropped.
//!
//! ```
//! # fn main() -> Result<(), hmm::HmmError> {
//! use hmm::{Hmm, PAGE_SIZE};
//! use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};
//! let hmm = Hmm::new()?;
//! let gpu = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("gpu0", 1 << 20))?;
//! let r = hmm.alloc(16 * PAGE_SIZE)?;
//! r.fill(0, r.len(), 7)?;
//! hmm::trace::start();
//! gpu.migrate_to_device(r.range())?;
//! let trace = hmm::trace::stop();
//! assert!(trace.events().iter().any(|e| e.name == "migrate to device"));
//! let mut json = Vec::new();
//! trace.write_chrome_json(&mut json).expect("a Vec takes every byte");
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// The most events one recording keeps.
pub const MAX_EVENTS: usize = 1_000_000;

static ON: AtomicBool = AtomicBool::new(false);
static DROPPED: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn sink() -> &'static Mutex<Vec<Event>> {
    static SINK: OnceLock<Mutex<Vec<Event>>> = OnceLock::new();
    SINK.get_or_init(|| Mutex::new(Vec::new()))
}

fn threads() -> &'static Mutex<BTreeMap<u64, String>> {
    static THREADS: OnceLock<Mutex<BTreeMap<u64, String>>> = OnceLock::new();
    THREADS.get_or_init(|| Mutex::new(BTreeMap::new()))
}

thread_local! {
    /// This thread's id as the trace shows it, and whether its name is known.
    static TID: (u64, std::cell::Cell<bool>) =
        (u64::from(crate::os::process::thread_id()), std::cell::Cell::new(false));
}

/// What kind of work an event is (its Chrome-trace category).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Category {
    /// A migration, from setup to its report.
    Migrate,
    /// A CPU touch of a device page, served by the fault service.
    CpuFault,
    /// A device's fault: `range_fault` filling its page table.
    DeviceFault,
    /// Mirrors told that a range changes, until the change is done.
    Invalidate,
    /// A phase of the application's own work (the demo's build, job, ...),
    /// for orientation on the timeline.
    Phase,
    /// A placement decision: a device fault decided, a prefetch, thrashing
    /// found, a page pinned.
    Policy,
}

impl Category {
    fn name(self) -> &'static str {
        match self {
            Category::Migrate => "migrate",
            Category::CpuFault => "cpu-fault",
            Category::DeviceFault => "device-fault",
            Category::Invalidate => "invalidate",
            Category::Phase => "phase",
            Category::Policy => "policy",
        }
    }
}

/// One recorded span of work.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Event {
    /// What happened ("migrate to device", "CPU fault", ...).
    pub name: &'static str,
    /// Its kind.
    pub category: Category,
    /// Start, nanoseconds since the first recording of this process.
    pub start_ns: u64,
    /// Duration, nanoseconds.
    pub duration_ns: u64,
    /// The thread that did it (the kernel's thread id).
    pub thread: u64,
    /// Details: addresses, page counts.
    pub args: Vec<(&'static str, u64)>,
}

/// Whether recording is on. Every recording site checks this first.
#[inline]
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Starts recording (clearing anything recorded before).
pub fn start() {
    let _ = epoch();
    sink().lock().unwrap_or_else(|e| e.into_inner()).clear();
    DROPPED.store(0, Ordering::Relaxed);
    ON.store(true, Ordering::SeqCst);
}

/// Stops recording and returns what was recorded.
pub fn stop() -> Trace {
    ON.store(false, Ordering::SeqCst);
    let events = std::mem::take(&mut *sink().lock().unwrap_or_else(|e| e.into_inner()));
    let threads = threads().lock().unwrap_or_else(|e| e.into_inner()).clone();
    Trace { events, threads, dropped: DROPPED.swap(0, Ordering::Relaxed) }
}

/// A span in progress; recorded when dropped (see [`span`]).
#[derive(Debug)]
pub struct Span {
    name: &'static str,
    category: Category,
    start: Instant,
    args: Vec<(&'static str, u64)>,
}

impl Span {
    /// Adds a detail to the event.
    pub fn arg(&mut self, key: &'static str, value: u64) {
        self.args.push((key, value));
    }
}

/// A span of `name` starting now, or `None` when recording is off (the only
/// cost then).
#[inline]
pub fn span(name: &'static str, category: Category) -> Option<Span> {
    if !enabled() {
        return None;
    }
    Some(Span { name, category, start: Instant::now(), args: Vec::new() })
}

impl Drop for Span {
    fn drop(&mut self) {
        // A span that outlives its recording is not kept for the next one.
        if !enabled() {
            return;
        }
        let end = Instant::now();
        let (thread, known) = TID.with(|(t, k)| (*t, k.replace(true)));
        if !known {
            let name = std::thread::current().name().unwrap_or("thread").to_string();
            threads().lock().unwrap_or_else(|e| e.into_inner()).insert(thread, name);
        }
        let event = Event {
            name: self.name,
            category: self.category,
            start_ns: self.start.saturating_duration_since(epoch()).as_nanos() as u64,
            duration_ns: end.saturating_duration_since(self.start).as_nanos() as u64,
            thread,
            args: std::mem::take(&mut self.args),
        };
        let mut sink = sink().lock().unwrap_or_else(|e| e.into_inner());
        if sink.len() < MAX_EVENTS {
            sink.push(event);
        } else {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What one recording holds.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    events: Vec<Event>,
    threads: BTreeMap<u64, String>,
    dropped: u64,
}

impl Trace {
    /// The events, in the order they ended.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Events beyond [`MAX_EVENTS`], not kept.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Events of each category.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for e in &self.events {
            *m.entry(e.category.name()).or_default() += 1;
        }
        m
    }

    /// Writes the trace in the Chrome trace event format: one complete
    /// (`"ph": "X"`) event per span, times in microseconds, one row per
    /// thread, named.
    pub fn write_chrome_json(&self, w: &mut dyn Write) -> io::Result<()> {
        let pid = std::process::id();
        let mut w = io::BufWriter::new(w);
        write!(
            w,
            "{{\"displayTimeUnit\":\"ns\",\"otherData\":{{\"dropped_events\":{}}},",
            self.dropped
        )?;
        w.write_all(b"\"traceEvents\":[\n")?;
        let mut first = true;
        let mut sep = |w: &mut io::BufWriter<&mut dyn Write>| -> io::Result<()> {
            if !std::mem::take(&mut first) {
                w.write_all(b",\n")?;
            }
            Ok(())
        };
        for (tid, name) in &self.threads {
            sep(&mut w)?;
            write!(
                w,
                "{{\"ph\":\"M\",\"name\":\"thread_name\",\"pid\":{pid},\"tid\":{tid},\"args\":{{\"name\":{}}}}}",
                serde_json::to_string(name).map_err(io::Error::other)?
            )?;
        }
        for e in &self.events {
            sep(&mut w)?;
            write!(
                w,
                "{{\"ph\":\"X\",\"name\":{},\"cat\":\"{}\",\"pid\":{pid},\"tid\":{},\"ts\":{:.3},\"dur\":{:.3},\"args\":{{",
                serde_json::to_string(e.name).map_err(io::Error::other)?,
                e.category.name(),
                e.thread,
                e.start_ns as f64 / 1e3,
                e.duration_ns as f64 / 1e3,
            )?;
            for (k, (key, value)) in e.args.iter().enumerate() {
                let comma = if k == 0 { "" } else { "," };
                let key = serde_json::to_string(key).map_err(io::Error::other)?;
                if key.ends_with("addr\"") {
                    write!(w, "{comma}{key}:\"{value:#x}\"")?;
                } else {
                    write!(w, "{comma}{key}:{value}")?;
                }
            }
            w.write_all(b"}}")?;
        }
        w.write_all(b"\n]}\n")?;
        w.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_recorded_while_off_and_spans_are_while_on() {
        // Recording is process-wide: this is the one unit test that turns it
        // on, but other tests' threads of the same process record meanwhile,
        // so only this thread's events are looked at.
        assert!(span("x", Category::Migrate).is_none());
        start();
        {
            let mut s = span("migrate to device", Category::Migrate).expect("on");
            s.arg("pages", 4);
            s.arg("addr", 0x1000);
        }
        let t = stop();
        assert!(span("y", Category::Migrate).is_none(), "off again");
        let me = u64::from(crate::os::process::thread_id());
        let mine: Vec<&Event> = t.events().iter().filter(|e| e.thread == me).collect();
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].args, [("pages", 4), ("addr", 0x1000)]);
        let mut out = Vec::new();
        t.write_chrome_json(&mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let ev = v["traceEvents"].as_array().unwrap();
        let x = ev.iter().find(|e| e["ph"] == "X" && e["tid"] == me).unwrap();
        assert_eq!(x["name"], "migrate to device");
        assert_eq!(x["cat"], "migrate");
        assert_eq!(x["args"]["addr"], "0x1000");
        assert!(ev.iter().any(|e| e["ph"] == "M" && e["name"] == "thread_name"));
    }
}
