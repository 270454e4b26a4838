//! A remote-memory tier for hmm: a device whose private memory is a Redis
//! server or a Redis Cluster, on hmm's public driver API. Device memory
//! becomes a store other machines hold: the way far memory grows past one
//! machine (FluidMem keeps a VM's pages in a key-value store the same way,
//! on a patched kernel; hmm needs none).
//!
//! - **Keys** are `hmm:<instance>:<page>:<generation>`, `<instance>` a random id each
//!   device draws at creation, so two processes (or two devices of one) on
//!   the same server never see each other's pages. A value is one page. A
//!   page of zeros is a flag kept here, not a key. Values may be compressed
//!   with the compressed tier's codec ([`RedisConfig::compression`]).
//! - **Batches are pipelined**: a migration's pages go out as pipelined
//!   `SET`s, a fault-back's come back as pipelined `GET`s, on worker threads
//!   (a job of a few pages on the submitting thread). `page_free` only
//!   queues the key (each store of a page takes a key of a new generation,
//!   so a queued delete never reaches what the page holds next); a
//!   background thread deletes them in pipelined batches,
//!   never on the fault path.
//! - **A slow server** is waited for up to [`RedisConfig::timeout`] per
//!   round trip; **a lost connection** is retried with doubling pauses for
//!   [`RedisConfig::retry_for`]. After that the device fails: every page it
//!   held is lost, and a CPU touch of one gets `SIGBUS` (hmm's own reads say
//!   `RangeError::Poisoned`). A page is never lost before it is stored: a
//!   `SET` that did not complete fails its copy, and the migration keeps the
//!   page where it was.
//! - **A server that lost its data** (restarted without persistence, say)
//!   is found out, never read back as zeros: an epoch key the device sets at
//!   creation is checked on every reconnection, and a page whose key is
//!   missing fails the device.
//! - **Bad configuration** (no server at the address, a wrong password, a
//!   cluster with slots unassigned, a TLS certificate not trusted) fails at
//!   creation, saying what to fix. TLS (`rediss://`) runs on rustls.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hmm::dma::{
    DmaEngine, DmaError, DmaFence, DmaJob, JobPart, SystemSink, ToDevice, ToSystem, Workers,
};
use hmm::migrate::MigrationReport;
use hmm::space::{Hmm, HmmError};
use hmm::{DeviceMemory, DeviceMemoryConfig, DevicePage, DevicePagemapOps, HmmHandle};
use hmm::{PAGE_SIZE, PageRange};
use redis::{ConnectionInfo, IntoConnectionInfo, RedisError};

/// How to reach the store and how much of it to use.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// Name for reports.
    pub name: String,
    /// `redis://host:port`, `rediss://host:port` (TLS), `unix:///path/to/socket`
    /// (one server), or the seed nodes of a cluster (with
    /// [`cluster`](Self::cluster)).
    pub urls: Vec<String>,
    /// Whether `urls` are the nodes of a Redis Cluster.
    pub cluster: bool,
    /// The user, where the server has users (ACL).
    pub username: Option<String>,
    /// The password.
    pub password: Option<String>,
    /// The pages the device may hold, in bytes.
    pub capacity: usize,
    /// How long one round trip (a pipelined batch) may take.
    pub timeout: Duration,
    /// How long a lost connection is retried before the device fails.
    pub retry_for: Duration,
    /// Worker threads (each with its own connection).
    pub workers: usize,
    /// Pages per pipelined batch.
    pub batch_pages: usize,
    /// Values compressed with the compressed tier's codec (a page that
    /// compresses to no less than itself is stored as it is), or not.
    pub compression: Option<hmm_compressed::Algorithm>,
    /// For `rediss://` servers whose certificate the system does not trust:
    /// the certificate authority to trust instead (a PEM file).
    pub tls_ca: Option<std::path::PathBuf>,
}

impl RedisConfig {
    /// A device on the server at `url`, holding up to `capacity` bytes.
    pub fn new(name: impl Into<String>, url: impl Into<String>, capacity: usize) -> Self {
        Self {
            name: name.into(),
            urls: vec![url.into()],
            cluster: false,
            username: None,
            password: None,
            capacity,
            timeout: Duration::from_secs(2),
            retry_for: Duration::from_secs(5),
            workers: 2,
            batch_pages: 256,
            compression: None,
            tls_ca: None,
        }
    }

    /// A device on the Redis Cluster whose nodes include `urls`.
    pub fn cluster(name: impl Into<String>, urls: Vec<String>, capacity: usize) -> Self {
        Self { urls, cluster: true, ..Self::new(name, String::new(), capacity) }
    }

    /// The same with values compressed by `algorithm`.
    pub fn with_compression(mut self, algorithm: hmm_compressed::Algorithm) -> Self {
        self.compression = Some(algorithm);
        self
    }

    /// The same with a password (and a user, where given).
    pub fn with_auth(mut self, username: Option<String>, password: impl Into<String>) -> Self {
        self.username = username;
        self.password = Some(password.into());
        self
    }

    fn check(&self) -> Result<Vec<ConnectionInfo>, HmmError> {
        let bad = |what: String| HmmError::Config(format!("redis device {:?}: {what}", self.name));
        if self.urls.is_empty() || self.urls.iter().any(String::is_empty) {
            return Err(bad("no server address: give redis://host:port or unix:///path".into()));
        }
        if !self.cluster && self.urls.len() > 1 {
            return Err(bad(format!(
                "{} addresses for one server: give one, or set `cluster` for a Redis Cluster's nodes",
                self.urls.len()
            )));
        }
        if self.capacity < PAGE_SIZE {
            return Err(bad(format!(
                "a capacity of {} bytes: give at least one page",
                self.capacity
            )));
        }
        if self.workers == 0 || self.batch_pages == 0 {
            return Err(bad("no workers, or batches of 0 pages: give at least 1 of each".into()));
        }
        if self.timeout.is_zero() {
            return Err(bad("a timeout of 0: give one (2 s by default)".into()));
        }
        self.urls
            .iter()
            .map(|u| {
                let info = u.as_str().into_connection_info().map_err(|e| {
                    bad(format!(
                        "{u:?} is not a Redis address ({e}): give redis://host:port or unix:///path"
                    ))
                })?;
                let mut r = info.redis_settings().clone();
                if let Some(user) = &self.username {
                    r = r.set_username(user);
                }
                if let Some(pass) = &self.password {
                    r = r.set_password(pass);
                }
                Ok(info.set_redis_settings(r))
            })
            .collect()
    }
}

/// What a device holds, and what it met.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedisStats {
    /// Pages stored in Redis.
    pub stored_pages: u64,
    /// Pages held as the zero flag (no key).
    pub zero_pages: u64,
    /// Keys freed and not yet deleted.
    pub pending_deletes: u64,
    /// Connections made again after one was lost.
    pub reconnects: u64,
    /// Whether the device failed (its pages were lost).
    pub failed: bool,
}

// ---- connections -----------------------------------------------------------------

/// One connection: to a server, or to a cluster (routing by key).
enum Conn {
    One(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

/// Runs a pipeline built by `$build` (with `$p` the pipeline) on `$conn`.
macro_rules! pipelined {
    ($conn:expr, $t:ty, |$p:ident| $build:expr) => {
        match $conn {
            Conn::One(c) => {
                let mut $p = redis::pipe();
                $build;
                $p.query::<$t>(c)
            }
            Conn::Cluster(c) => {
                let mut $p = redis::cluster::cluster_pipe();
                $build;
                $p.query::<$t>(&mut **c)
            }
        }
    };
}

impl Conn {
    fn set_many(&mut self, kv: &[(String, &[u8])]) -> Result<(), RedisError> {
        pipelined!(self, (), |p| {
            for (k, v) in kv {
                p.set(k, *v).ignore();
            }
        })
    }

    fn get_many(&mut self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, RedisError> {
        pipelined!(self, Vec<Option<Vec<u8>>>, |p| {
            for k in keys {
                p.get(k);
            }
        })
    }

    fn del_many(&mut self, keys: &[String]) -> Result<(), RedisError> {
        pipelined!(self, (), |p| {
            for k in keys {
                p.del(k).ignore();
            }
        })
    }
}

/// Whether `e` means the connection is gone or the server too slow: worth
/// connecting again (other errors are the server refusing the command).
fn is_lost(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// How to connect, and the connections not in use.
struct Link {
    infos: Vec<ConnectionInfo>,
    cluster: bool,
    timeout: Duration,
    /// The certificate authority for TLS servers, where given (PEM).
    ca: Option<Vec<u8>>,
    idle: Mutex<Vec<Conn>>,
}

/// A client of one server, with the configured certificate authority.
fn client(info: &ConnectionInfo, ca: &Option<Vec<u8>>) -> Result<redis::Client, RedisError> {
    match ca {
        Some(pem) => {
            tls_provider();
            let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(pem.clone()) };
            redis::Client::build_with_tls(info.clone(), certs)
        }
        None => {
            if matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
                tls_provider();
            }
            redis::Client::open(info.clone())
        }
    }
}

/// Installs rustls's aws-lc-rs provider as the process's default, once (a
/// provider the application installed first stays).
fn tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

impl Link {
    fn connect(&self) -> Result<Conn, RedisError> {
        if self.cluster {
            let mut b = redis::cluster::ClusterClientBuilder::new(self.infos.clone())
                .connection_timeout(self.timeout)
                .response_timeout(self.timeout);
            if let Some(pem) = &self.ca {
                tls_provider();
                b = b.certs(redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                });
            }
            let c = b.build()?.get_connection()?;
            return Ok(Conn::Cluster(Box::new(c)));
        }
        let c = client(&self.infos[0], &self.ca)?.get_connection_with_timeout(self.timeout)?;
        c.set_read_timeout(Some(self.timeout))?;
        c.set_write_timeout(Some(self.timeout))?;
        Ok(Conn::One(c))
    }

    fn take(&self) -> Option<Conn> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn put(&self, c: Conn) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(c);
    }
}

/// What a device's operation met.
#[derive(Debug)]
enum Failure {
    /// The store is gone (or lost its data): the device has failed.
    Down,
    /// The server refused the command, for this reason.
    Refused(String),
}

impl From<Failure> for DmaError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Down => DmaError::DeviceFailed,
            Failure::Refused(why) => DmaError::Failed(why),
        }
    }
}

// ---- the device's state ------------------------------------------------------------

const EMPTY: u8 = 0;
const ZERO: u8 = 1;
const STORED: u8 = 2;

/// A device page's state, and the generation of its key: each store of the
/// page takes a new generation (a new key), so a delete queued for a freed
/// page never reaches the data the page holds next.
#[derive(Debug, Clone, Copy)]
struct Slot {
    state: u8,
    generation: u32,
}

/// What the callbacks, the engine and the background thread share.
struct Shared {
    link: Link,
    prefix: String,
    epoch: String,
    retry_for: Duration,
    batch: usize,
    compression: Option<hmm_compressed::Algorithm>,
    /// Per device page.
    pages: Mutex<Vec<Slot>>,
    /// Keys freed, to delete: (page, generation).
    deletes: Mutex<Vec<(u32, u32)>>,
    wake: Condvar,
    wake_lock: Mutex<bool>,
    failed: AtomicBool,
    reconnects: AtomicU64,
    stopping: AtomicBool,
}

impl Shared {
    fn pages(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn key(&self, page: u32, generation: u32) -> String {
        format!("{}{page}:{generation}", self.prefix)
    }

    fn epoch_key(&self) -> String {
        format!("{}epoch", self.prefix)
    }

    /// Runs `op` on a connection, connecting again (after checking that
    /// the server kept its data) while the connection is lost, for up to
    /// `retry_for`; then fails the device.
    fn run<T>(&self, mut op: impl FnMut(&mut Conn) -> Result<T, RedisError>) -> Result<T, Failure> {
        if self.failed.load(Ordering::Acquire) {
            return Err(Failure::Down);
        }
        let mut conn = self.link.take();
        let mut first_loss: Option<Instant> = None;
        let mut pause = Duration::from_millis(5);
        loop {
            if conn.is_none() {
                match self.reconnect() {
                    Ok(c) => conn = Some(c),
                    Err(Some(f)) => return Err(f),
                    Err(None) => {}
                }
            }
            if let Some(c) = conn.as_mut() {
                match op(c) {
                    Ok(v) => {
                        self.link.put(conn.take().expect("a connection"));
                        return Ok(v);
                    }
                    Err(e) if is_lost(&e) => {
                        tracing::warn!(error = %e, "lost the connection to Redis; retrying");
                        conn = None;
                    }
                    Err(e) => {
                        self.link.put(conn.take().expect("a connection"));
                        return Err(Failure::Refused(e.to_string()));
                    }
                }
            }
            let since = *first_loss.get_or_insert_with(Instant::now);
            if since.elapsed() >= self.retry_for || self.stopping.load(Ordering::Acquire) {
                tracing::error!(after = ?self.retry_for, "Redis stayed out of reach: the device fails");
                self.fail();
                return Err(Failure::Down);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// A new connection to a server that still holds this device's epoch.
    /// `Err(None)`: out of reach (try again); `Err(Some(Down))`: the server
    /// lost its data, and the device has failed.
    fn reconnect(&self) -> Result<Conn, Option<Failure>> {
        let mut c = self.link.connect().map_err(|_| None)?;
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        match c.get_many(&[self.epoch_key()]) {
            Ok(v)
                if v.first()
                    .and_then(Option::as_ref)
                    .is_some_and(|e| *e == self.epoch.as_bytes()) =>
            {
                Ok(c)
            }
            Ok(_) => {
                tracing::error!(
                    "Redis no longer holds this device's epoch: it lost its data; the device fails"
                );
                self.fail();
                Err(Some(Failure::Down))
            }
            Err(_) => Err(None),
        }
    }

    fn fail(&self) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            self.poke();
        }
    }

    fn poke(&self) {
        *self.wake_lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.notify_all();
    }

    /// Stores `ops` (pipelined in batches).
    fn to_device(&self, ops: &[ToDevice]) -> Vec<Result<(), DmaError>> {
        let mut out: Vec<Result<(), DmaError>> = Vec::with_capacity(ops.len());
        for part in ops.chunks(self.batch) {
            let mut data = vec![0u8; part.len() * PAGE_SIZE];
            let mut zero = vec![false; part.len()];
            let mut bad: Vec<Option<DmaError>> = vec![None; part.len()];
            for (k, op) in part.iter().enumerate() {
                let page = &mut data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
                match op.src.bytes() {
                    None => zero[k] = true,
                    Some((m, off)) => match m.read(off, page) {
                        Ok(()) => zero[k] = page.iter().all(|b| *b == 0),
                        Err(e) => {
                            bad[k] = Some(DmaError::Failed(format!("reading the source: {e}")))
                        }
                    },
                }
            }
            // Each store under a new generation of the page's key.
            let gens: Vec<u32> = {
                let pages = self.pages();
                part.iter()
                    .map(|op| pages[op.dst.index as usize].generation.wrapping_add(1))
                    .collect()
            };
            let values: Vec<Vec<u8>> = match self.compression {
                Some(a) => part
                    .iter()
                    .enumerate()
                    .map(|(k, _)| match zero[k] || bad[k].is_some() {
                        true => Vec::new(),
                        false => pack(a, &data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]),
                    })
                    .collect(),
                None => Vec::new(),
            };
            let kv: Vec<(String, &[u8])> = part
                .iter()
                .enumerate()
                .filter(|(k, _)| !zero[*k] && bad[*k].is_none())
                .map(|(k, op)| {
                    let v: &[u8] = match self.compression {
                        Some(_) => &values[k],
                        None => &data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE],
                    };
                    (self.key(op.dst.index, gens[k]), v)
                })
                .collect();
            let stored = if kv.is_empty() { Ok(()) } else { self.run(|c| c.set_many(&kv)) };
            let mut pages = self.pages();
            for (k, op) in part.iter().enumerate() {
                out.push(match (&bad[k], &stored) {
                    (Some(e), _) => Err(e.clone()),
                    (None, _) if zero[k] => {
                        pages[op.dst.index as usize].state = ZERO;
                        Ok(())
                    }
                    (None, Ok(())) => {
                        pages[op.dst.index as usize] = Slot { state: STORED, generation: gens[k] };
                        Ok(())
                    }
                    (None, Err(Failure::Down)) => Err(DmaError::DeviceFailed),
                    (None, Err(Failure::Refused(why))) => Err(DmaError::Failed(why.clone())),
                });
            }
        }
        out
    }

    /// Fetches `copies` (pipelined in batches) and installs them, each run
    /// of consecutive addresses with one `UFFDIO_COPY`.
    fn to_system(&self, sink: &SystemSink, copies: &[ToSystem]) -> Vec<Result<(), DmaError>> {
        let mut out = Vec::with_capacity(copies.len());
        for part in copies.chunks(self.batch) {
            let slots: Vec<Slot> = {
                let pages = self.pages();
                part.iter()
                    .map(|c| {
                        pages
                            .get(c.src.index as usize)
                            .copied()
                            .unwrap_or(Slot { state: EMPTY, generation: 0 })
                    })
                    .collect()
            };
            let kinds: Vec<u8> = slots.iter().map(|s| s.state).collect();
            let keys: Vec<String> = part
                .iter()
                .zip(&slots)
                .filter(|(_, s)| s.state == STORED)
                .map(|(c, s)| self.key(c.src.index, s.generation))
                .collect();
            let got =
                if keys.is_empty() { Ok(Vec::new()) } else { self.run(|c| c.get_many(&keys)) };
            let mut got = match got {
                Ok(v) if v.len() == keys.len() => v.into_iter(),
                Ok(_) => {
                    out.extend(
                        part.iter()
                            .map(|_| Err(DmaError::Failed("Redis answered a batch short".into()))),
                    );
                    continue;
                }
                Err(f) => {
                    let e = DmaError::from(f);
                    out.extend(part.iter().map(|_| Err(e.clone())));
                    continue;
                }
            };
            let mut data = vec![0u8; part.len() * PAGE_SIZE];
            let mut res: Vec<Result<(), DmaError>> = Vec::with_capacity(part.len());
            for (k, kind) in kinds.iter().enumerate() {
                res.push(match *kind {
                    ZERO => Ok(()),
                    STORED => match got.next().flatten() {
                        Some(v) => {
                            let page = &mut data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
                            if unpack(self.compression, &v, page) {
                                Ok(())
                            } else {
                                Err(DmaError::Failed(format!(
                                    "a value of {} bytes in Redis is not a page",
                                    v.len()
                                )))
                            }
                        }
                        None => {
                            // Stored, and gone: the server lost data.
                            tracing::error!(
                                page = part[k].src.index,
                                "a page is missing from Redis: the device fails"
                            );
                            self.fail();
                            Err(DmaError::DeviceFailed)
                        }
                    },
                    _ => Err(DmaError::Failed(format!(
                        "device page {} holds nothing",
                        part[k].src.index
                    ))),
                });
            }
            // Runs of pages in hand, each installed whole.
            let mut k = 0;
            while k < part.len() {
                if let Err(e) = &res[k] {
                    out.push(Err(e.clone()));
                    k += 1;
                    continue;
                }
                let mut l = k + 1;
                while l < part.len()
                    && res[l].is_ok()
                    && part[l].dst.get() == part[l - 1].dst.get() + PAGE_SIZE
                {
                    l += 1;
                }
                out.extend(sink.install_bytes(part[k].dst, &data[k * PAGE_SIZE..l * PAGE_SIZE]));
                k = l;
            }
        }
        out
    }

    /// Deletes the freed keys, in pipelined batches.
    fn flush_deletes(&self) {
        loop {
            let batch: Vec<(u32, u32)> = {
                let mut d = self.deletes.lock().unwrap_or_else(|e| e.into_inner());
                let n = d.len().min(self.batch.max(512));
                d.drain(..n).collect()
            };
            if batch.is_empty() || self.failed.load(Ordering::Acquire) {
                return;
            }
            // Each key names its generation: a page stored again since has
            // a key of its own, which this leaves alone.
            let keys: Vec<String> = batch.iter().map(|(p, g)| self.key(*p, *g)).collect();
            if let Err(f) = self.run(|c| c.del_many(&keys)) {
                tracing::warn!(?f, keys = keys.len(), "freed pages not deleted from Redis");
                return;
            }
        }
    }
}

/// A value's first byte, with compression on: what follows.
const RAW: u8 = 0;
const PACKED: u8 = 1;

/// The value of `page` with compression on: `PACKED` and the compressed
/// bytes, or `RAW` and the page where that is no smaller.
fn pack(algorithm: hmm_compressed::Algorithm, page: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 1 + hmm_compressed::PACKED_BYTES];
    match hmm_compressed::codec::compress(algorithm, page, &mut out[1..]) {
        Some(n) if n < PAGE_SIZE => {
            out[0] = PACKED;
            out.truncate(1 + n);
        }
        _ => {
            out[0] = RAW;
            out.truncate(1 + PAGE_SIZE);
            out[1..].copy_from_slice(page);
        }
    }
    out
}

/// Puts value `v` back into `page`; whether it was one page.
fn unpack(compression: Option<hmm_compressed::Algorithm>, v: &[u8], page: &mut [u8]) -> bool {
    match (compression, v.split_first()) {
        (None, _) if v.len() == PAGE_SIZE => {
            page.copy_from_slice(v);
            true
        }
        (Some(_), Some((&RAW, rest))) if rest.len() == PAGE_SIZE => {
            page.copy_from_slice(rest);
            true
        }
        (Some(a), Some((&PACKED, rest))) => hmm_compressed::codec::decompress(a, rest, page),
        _ => false,
    }
}

/// The background thread: deletes freed keys, and fails the device in hmm
/// when the store is lost.
fn background(shared: Arc<Shared>, hmm: HmmHandle, mem: Weak<DeviceMemory>) {
    let mut reported = false;
    loop {
        {
            let g = shared.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
            let (mut g, _) = shared
                .wake
                .wait_timeout_while(g, Duration::from_millis(20), |woken| !*woken)
                .unwrap_or_else(|e| e.into_inner());
            *g = false;
        }
        if shared.failed.load(Ordering::Acquire) && !reported {
            reported = true;
            if let Some(mem) = mem.upgrade() {
                let lost = hmm.device_failed(&mem);
                tracing::error!(lost, "the Redis device failed: its pages are lost");
            }
        }
        shared.flush_deletes();
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
    }
}

// ---- the engine and the callbacks --------------------------------------------------

struct Engine {
    workers: Workers,
}

impl Engine {
    fn new(shared: Arc<Shared>, workers: usize, name: &str) -> std::io::Result<Self> {
        let workers = Workers::new(workers, &format!("hmm-r-{name}"), move |part| match part {
            JobPart::ToDevice(ops) => shared.to_device(ops),
            JobPart::ToSystem { copies, sink } => shared.to_system(sink, copies),
        })?;
        Ok(Self { workers })
    }
}

impl DmaEngine for Engine {
    fn name(&self) -> &str {
        "redis"
    }

    fn submit(&self, job: DmaJob) -> DmaFence {
        self.workers.submit(job)
    }
}

struct Core {
    shared: Arc<Shared>,
    engine: Engine,
}

impl DevicePagemapOps for Core {
    /// Queues the key for the background thread (no round trip here: this
    /// may run on the fault service). A zero page just forgets its flag.
    fn page_free(&self, page: DevicePage) {
        let stored = {
            let mut pages = self.shared.pages();
            let Some(p) = pages.get_mut(page.index as usize) else { return };
            let stored = p.state == STORED;
            p.state = EMPTY;
            stored.then_some(p.generation)
        };
        if let Some(generation) = stored {
            let mut d = self.shared.deletes.lock().unwrap_or_else(|e| e.into_inner());
            d.push((page.index, generation));
        }
    }

    fn dma(&self) -> &dyn DmaEngine {
        &self.engine
    }
}

// ---- the device --------------------------------------------------------------------

/// A remote-memory tier on Redis (see the crate docs).
pub struct RedisDevice {
    hmm: HmmHandle,
    mem: Arc<DeviceMemory>,
    core: Arc<Core>,
    background: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RedisDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDevice")
            .field("name", &self.mem.name())
            .field("prefix", &self.core.shared.prefix)
            .field("stats", &self.stats())
            .finish()
    }
}

/// A random instance id: the process, the time, and the standard library's
/// per-process hash keys, mixed.
fn instance_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// What a failed first connection means, and what to do.
fn explain(url: &str, e: &RedisError) -> String {
    use redis::ErrorKind;
    let text = e.to_string();
    if e.kind() == ErrorKind::AuthenticationFailed
        || text.contains("WRONGPASS")
        || text.contains("NOAUTH")
    {
        return format!(
            "the server at {url} refused the credentials ({e}): give the right user and password (RedisConfig::with_auth)"
        );
    }
    if text.contains("certificate")
        || text.contains("InvalidCertificate")
        || text.contains("UnknownIssuer")
    {
        return format!(
            "the TLS server at {url} has a certificate this process does not trust ({e}): give its \
             certificate authority (RedisConfig::tls_ca), or add it to the system's trust store"
        );
    }
    if is_lost(e) {
        return format!(
            "no Redis server answers at {url} ({e}): start one (redis-server), or give the address of one"
        );
    }
    format!("cannot use the server at {url}: {e}")
}

impl RedisDevice {
    /// Connects, checks the store, and registers the device's memory with
    /// `hmm`. Bad configuration fails here, saying what to fix.
    pub fn new(hmm: &Hmm, config: RedisConfig) -> Result<Self, HmmError> {
        let infos = config.check()?;
        let bad =
            |what: String| HmmError::Config(format!("redis device {:?}: {what}", config.name));
        let ca = match &config.tls_ca {
            Some(p) => Some(std::fs::read(p).map_err(|e| {
                bad(format!("cannot read the certificate authority {}: {e}", p.display()))
            })?),
            None => None,
        };
        if config.cluster {
            check_cluster(&config, &infos, &ca).map_err(bad)?;
        }
        let link = Link {
            infos,
            cluster: config.cluster,
            timeout: config.timeout,
            ca,
            idle: Mutex::new(Vec::new()),
        };
        let url = config.urls.join(", ");
        let mut conn = link.connect().map_err(|e| bad(explain(&url, &e)))?;
        let id = instance_id();
        let prefix = format!("hmm:{id:016x}:");
        let epoch = format!("{:016x}", instance_id());
        let epoch_key = format!("{prefix}epoch");
        conn.set_many(&[(epoch_key, epoch.as_bytes())]).map_err(|e| bad(explain(&url, &e)))?;
        link.put(conn);
        let pages = config.capacity / PAGE_SIZE;
        let shared = Arc::new(Shared {
            link,
            prefix,
            epoch,
            retry_for: config.retry_for,
            batch: config.batch_pages,
            compression: config.compression,
            pages: Mutex::new(vec![Slot { state: EMPTY, generation: 0 }; pages]),
            deletes: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            wake_lock: Mutex::new(false),
            failed: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        });
        let engine =
            Engine::new(shared.clone(), config.workers, &config.name).map_err(HmmError::Thread)?;
        let core = Arc::new(Core { shared: shared.clone(), engine });
        let mc = DeviceMemoryConfig::private(config.name.clone(), pages * PAGE_SIZE);
        let mem = hmm.register_device_memory(mc, core.clone())?;
        let (h, weak) = (hmm.handle(), Arc::downgrade(&mem));
        let background = std::thread::Builder::new()
            .name(format!("hmm-r-{}-bg", config.name))
            .spawn(move || background(shared, h, weak))
            .map_err(HmmError::Thread)?;
        Ok(Self { hmm: hmm.handle(), mem, core, background: Some(background) })
    }

    /// The device's memory region.
    pub fn memory(&self) -> &Arc<DeviceMemory> {
        &self.mem
    }

    /// The prefix of this device's keys (`hmm:<instance>:`).
    pub fn key_prefix(&self) -> &str {
        &self.core.shared.prefix
    }

    /// Stores the pages of `range` that are in system memory in Redis.
    pub fn migrate_to_device(&self, range: PageRange) -> Result<MigrationReport, HmmError> {
        self.hmm.migrate_to_device(range, &self.mem, self.mem.ops().dma())
    }

    /// Brings the device's pages in `range` back to system memory.
    pub fn migrate_to_system(&self, range: PageRange) -> Result<MigrationReport, HmmError> {
        self.hmm.migrate_to_system(range, &self.mem, self.mem.ops().dma())
    }

    /// What the device holds now.
    pub fn stats(&self) -> RedisStats {
        let s = &self.core.shared;
        let (mut stored, mut zero) = (0, 0);
        for p in s.pages().iter() {
            match p.state {
                STORED => stored += 1,
                ZERO => zero += 1,
                _ => {}
            }
        }
        RedisStats {
            stored_pages: stored,
            zero_pages: zero,
            pending_deletes: s.deletes.lock().unwrap_or_else(|e| e.into_inner()).len() as u64,
            reconnects: s.reconnects.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Acquire),
        }
    }
}

/// A cluster whose every slot is served, or why not.
fn check_cluster(
    config: &RedisConfig,
    infos: &[ConnectionInfo],
    ca: &Option<Vec<u8>>,
) -> Result<(), String> {
    let mut last = String::new();
    for (url, info) in config.urls.iter().zip(infos) {
        let c = client(info, ca).and_then(|c| c.get_connection_with_timeout(config.timeout));
        let mut c = match c {
            Ok(c) => c,
            Err(e) => {
                last = explain(url, &e);
                continue;
            }
        };
        let text: String = match redis::cmd("CLUSTER").arg("INFO").query(&mut c) {
            Ok(t) => t,
            Err(e) => {
                return Err(format!(
                    "{url} does not answer CLUSTER INFO ({e}): is it a cluster node (cluster-enabled yes)?"
                ));
            }
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')))
                .map(str::trim)
                .unwrap_or("?")
                .to_string()
        };
        if field("cluster_state") != "ok" {
            return Err(format!(
                "the cluster is not serving every slot (cluster_state:{}, {} of 16384 slots assigned, at {url}): \
                 assign them (redis-cli --cluster create, or --cluster fix)",
                field("cluster_state"),
                field("cluster_slots_assigned")
            ));
        }
        return Ok(());
    }
    Err(last)
}

impl Drop for RedisDevice {
    fn drop(&mut self) {
        if let Err(e) = self.hmm.unregister_device_memory(&self.mem) {
            tracing::error!(error = %e, "releasing a Redis device");
        }
        self.core.engine.workers.stop();
        let s = &self.core.shared;
        s.stopping.store(true, Ordering::Release);
        s.poke();
        if let Some(h) = self.background.take() {
            let _ = h.join();
        }
        // The epoch key goes too (best effort: the store may be gone).
        if !s.failed.load(Ordering::Acquire) {
            let key = s.epoch_key();
            let _ = s.run(|c| c.del_many(std::slice::from_ref(&key)));
        }
    }
}

/// `redis-server`, under `setpriv --pdeathsig KILL` where the machine has
/// it: a server whose starter dies without dropping its [`LocalServer`]
/// (killed, or crashed) goes with it instead of staying behind. The signal
/// follows the *thread* that started it, so a `LocalServer` is started on a
/// thread that outlives it.
pub fn server_command() -> std::process::Command {
    let setpriv = std::path::Path::new("/usr/bin/setpriv");
    if setpriv.is_file() {
        let mut c = std::process::Command::new(setpriv);
        c.args(["--pdeathsig", "KILL", "redis-server"]);
        c
    } else {
        std::process::Command::new("redis-server")
    }
}

/// A `redis-server` of this process's own, on a unix socket in a directory
/// of its own, for a demo or a benchmark that has no server to point at:
/// started with persistence off, killed (and its directory removed) when
/// dropped, or when the thread that started it dies ([`server_command`]).
#[derive(Debug)]
pub struct LocalServer {
    child: std::process::Child,
    dir: std::path::PathBuf,
    url: String,
}

impl LocalServer {
    /// Starts one and waits (up to 10 s) until it answers; says why not
    /// (no `redis-server` on `PATH`, say).
    pub fn start() -> Result<LocalServer, String> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("hmm-redis-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        let sock = dir.join("redis.sock");
        let child = server_command()
            .args(["--port", "0", "--save", "", "--appendonly", "no", "--unixsocket"])
            .arg(&sock)
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| {
                let _ = std::fs::remove_dir_all(&dir);
                format!(
                    "cannot start redis-server ({e}): install it (apt-get install redis-server)"
                )
            })?;
        let s = LocalServer { child, dir, url: format!("unix://{}", sock.display()) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = redis::Client::open(s.url.as_str())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if up.is_ok() {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err("redis-server did not answer within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Its address (`unix:///...`).
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
