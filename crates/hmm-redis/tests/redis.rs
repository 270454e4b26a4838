//! The Redis tier against real servers this test starts and stops: one on
//! a unix socket, and a three-node cluster on loopback. Skipped, with the
//! reason, where `redis-server` cannot be had.

#[path = "../../hmm/tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hmm::os::process::{ChildOutcome, spawn_child};
use hmm::{Hmm, HmmError, ManagedRange, PAGE_SIZE, RangeError, Residency};
use hmm_redis::{RedisConfig, RedisDevice};

/// A `redis-server` of the test's own, killed when dropped.
struct Server {
    child: Option<Child>,
    dir: PathBuf,
    args: Vec<String>,
    url: String,
    port: Option<u16>,
}

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn have_redis() -> bool {
    let found =
        Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_ok();
    if !found {
        eprintln!(
            "SKIP: redis-server not found (.ci/run installs it: apt-get install redis-server)"
        );
    }
    found
}

impl Server {
    /// A server on a unix socket in a directory of its own, with `extra`
    /// arguments (`--requirepass`, say).
    fn unix(extra: &[&str]) -> Server {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("hmm-redis-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("redis.sock");
        let mut args: Vec<String> =
            ["--port", "0", "--unixsocket"].iter().map(|s| s.to_string()).collect();
        args.push(sock.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut s = Server {
            child: None,
            dir,
            args,
            url: format!("unix://{}", sock.display()),
            port: None,
        };
        s.start();
        s
    }

    /// A cluster-enabled node on a free loopback port.
    fn cluster_node() -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("hmm-redis-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let args = vec![
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--cluster-enabled".into(),
            "yes".into(),
            "--cluster-config-file".into(),
            dir.join("nodes.conf").display().to_string(),
        ];
        let mut s = Server {
            child: None,
            dir,
            args,
            url: format!("redis://127.0.0.1:{port}"),
            port: Some(port),
        };
        s.start();
        s
    }

    /// Starts the server (again: empty), and waits until it answers.
    fn start(&mut self) {
        // Killed with the test if it dies without dropping this.
        let child = hmm_redis::server_command()
            .args(&self.args)
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) =
                redis::Client::open(self.url.as_str()).and_then(|c| c.get_connection())
            {
                let pong: Result<String, _> = redis::cmd("PING").query(&mut c);
                // A server with a password answers NOAUTH: it is up.
                if pong.is_ok() || pong.as_ref().is_err_and(|e| e.code() == Some("NOAUTH")) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server at {} did not answer within 10 s",
                self.url
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `kill -9`.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url.as_str()).unwrap().get_connection().unwrap()
    }

    /// Keys whose names start with `prefix`.
    fn keys(&self, prefix: &str) -> usize {
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("{prefix}*")).query(&mut self.conn()).unwrap();
        keys.len()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn page(i: usize) -> Vec<u8> {
    if i % 8 == 3 {
        return vec![0; PAGE_SIZE];
    }
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
    (0..PAGE_SIZE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_ne_bytes()
        })
        .collect()
}

fn filled(hmm: &Hmm, pages: usize) -> (ManagedRange, Vec<u8>) {
    let r = hmm.alloc(pages * PAGE_SIZE).unwrap();
    let want: Vec<u8> = (0..pages).flat_map(page).collect();
    r.write(0, &want).unwrap();
    (r, want)
}

/// Pages go to the server as one key each (zero pages as a flag), come back
/// by CPU touches in both fault modes, and their keys are deleted once the
/// pages are back.
#[test]
fn pages_round_trip_through_redis_and_their_keys_are_deleted() {
    if common::skip_without_uffd() || !have_redis() {
        return;
    }
    let server = Server::unix(&[]);
    for mode in common::fault_modes() {
        let hmm = common::instance(mode);
        let dev = RedisDevice::new(&hmm, RedisConfig::new("r", &server.url, 4 << 20)).unwrap();
        let pages = 256;
        let (r, want) = filled(&hmm, pages);
        let rep = dev.migrate_to_device(r.range()).unwrap();
        assert_eq!(rep.migrated, pages, "{mode:?}: {:?}", rep.skipped.first());
        let zero = (0..pages).filter(|i| i % 8 == 3).count();
        let s = dev.stats();
        assert_eq!(
            (s.stored_pages as usize, s.zero_pages as usize),
            (pages - zero, zero),
            "{mode:?}"
        );
        // One key a stored page, and the epoch.
        assert_eq!(server.keys(dev.key_prefix()), pages - zero + 1, "{mode:?}");
        let got = common::cpu_bytes(&r);
        assert_eq!(common::first_wrong_page(&got, &want), None, "{mode:?}");
        // Pages of fault-around windows are recorded when their migration
        // ends, which may be after the read (DESIGN.md, "What is exact when
        // a call returns").
        hmm.settle(Duration::from_secs(10)).unwrap();
        assert!(r.residencies().iter().all(|x| *x == Residency::System));
        common::eventually("the freed pages' keys deleted", || server.keys(dev.key_prefix()) == 1);
        drop(dev);
        assert_eq!(server.keys("hmm:"), 0, "{mode:?}: the epoch goes with the device");
    }
}

/// Unmapping frees the keys; `mremap` carries remote pages to the new
/// address; a forked child reads them.
#[test]
fn munmap_mremap_and_fork_with_remote_pages() {
    if common::skip_without("event-fork") || !have_redis() {
        return;
    }
    let _fork = common::fork_lock();
    let server = Server::unix(&[]);
    let hmm = Hmm::new().unwrap();
    let dev = RedisDevice::new(&hmm, RedisConfig::new("r", &server.url, 4 << 20)).unwrap();
    let (r, _) = filled(&hmm, 64);
    dev.migrate_to_device(r.range()).unwrap();
    drop(r);
    common::eventually("the unmapped pages' keys deleted", || server.keys(dev.key_prefix()) == 1);

    let (r, want) = filled(&hmm, 64);
    dev.migrate_to_device(r.range()).unwrap();
    let moved = r.mapping().move_part(r.range()).unwrap();
    let mut got = vec![0u8; moved.len()];
    moved.read(0, &mut got).unwrap();
    assert_eq!(common::first_wrong_page(&got, &want), None, "the bytes at the new address");
    drop(moved);
    drop(r);

    let (r, want) = filled(&hmm, 64);
    dev.migrate_to_device(r.range()).unwrap();
    let child = spawn_child(|| common::child_reads_back(&r, &want)).unwrap();
    assert_eq!(
        child.wait_within(common::CHILD_LIMIT).unwrap(),
        ChildOutcome::Exited(0),
        "10 + page: wrong"
    );
}

/// Two devices on one server (as two processes would be) each see only
/// their own keys.
#[test]
fn two_devices_on_one_server_see_only_their_own_keys() {
    if common::skip_without_uffd() || !have_redis() {
        return;
    }
    let server = Server::unix(&[]);
    let (h1, h2) = (Hmm::new().unwrap(), Hmm::new().unwrap());
    let d1 = RedisDevice::new(&h1, RedisConfig::new("a", &server.url, 1 << 20)).unwrap();
    let d2 = RedisDevice::new(&h2, RedisConfig::new("b", &server.url, 1 << 20)).unwrap();
    assert_ne!(d1.key_prefix(), d2.key_prefix());
    let (r1, w1) = filled(&h1, 16);
    let (r2, w2) = filled(&h2, 40);
    d1.migrate_to_device(r1.range()).unwrap();
    d2.migrate_to_device(r2.range()).unwrap();
    let stored = |d: &RedisDevice| d.stats().stored_pages as usize + 1;
    assert_eq!(server.keys(d1.key_prefix()), stored(&d1));
    assert_eq!(server.keys(d2.key_prefix()), stored(&d2));
    assert_eq!(server.keys("hmm:"), stored(&d1) + stored(&d2));
    let (mut g1, mut g2) = (vec![0u8; r1.len()], vec![0u8; r2.len()]);
    r1.read(0, &mut g1).unwrap();
    r2.read(0, &mut g2).unwrap();
    assert_eq!(
        (common::first_wrong_page(&g1, &w1), common::first_wrong_page(&g2, &w2)),
        (None, None)
    );
}

/// Bad configuration fails at creation with what to fix.
#[test]
fn bad_configuration_fails_at_creation_with_what_to_fix() {
    if common::skip_without_uffd() || !have_redis() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let guarded = Server::unix(&["--requirepass", "sesame"]);
    let missing = std::env::temp_dir().join("hmm-redis-nothing-here.sock");
    let cases = [
        (
            RedisConfig::new("r", format!("unix://{}", missing.display()), 1 << 20),
            "no Redis server answers",
        ),
        (RedisConfig::new("r", "redis://127.0.0.1:1", 1 << 20), "no Redis server answers"),
        (RedisConfig::new("r", "http://example", 1 << 20), "not a Redis address"),
        (RedisConfig::new("r", &guarded.url, 1 << 20), "credentials"),
        (RedisConfig::new("r", &guarded.url, 1 << 20).with_auth(None, "wrong"), "credentials"),
        (RedisConfig::new("r", &guarded.url, 100), "capacity"),
    ];
    for (cfg, what) in cases {
        match RedisDevice::new(&hmm, cfg) {
            Err(HmmError::Config(m)) => assert!(m.contains(what), "{what}: {m}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    // The right password works.
    RedisDevice::new(&hmm, RedisConfig::new("r", &guarded.url, 1 << 20).with_auth(None, "sesame"))
        .unwrap();
    // A cluster node none of whose slots are assigned.
    let lone = Server::cluster_node();
    match RedisDevice::new(&hmm, RedisConfig::cluster("c", vec![lone.url.clone()], 1 << 20)) {
        Err(HmmError::Config(m)) => assert!(m.contains("slots") && m.contains("--cluster"), "{m}"),
        other => panic!("a cluster without slots: {other:?}"),
    }
}

/// Reads every page of `r` one by one with hmm's checked read: each is
/// either the right bytes or lost (`Poisoned`); returns how many were lost.
fn right_or_lost(r: &ManagedRange, want: &[u8]) -> usize {
    let mut lost = 0;
    for p in 0..r.pages() {
        let mut b = vec![0u8; PAGE_SIZE];
        match r.read(p * PAGE_SIZE, &mut b) {
            Ok(()) => {
                assert_eq!(&b[..], &want[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], "page {p} read wrong")
            }
            Err(RangeError::Poisoned(_)) => lost += 1,
            Err(e) => panic!("page {p}: {e}"),
        }
    }
    lost
}

fn quick(url: &str) -> RedisConfig {
    RedisConfig {
        retry_for: Duration::from_millis(300),
        timeout: Duration::from_millis(500),
        ..RedisConfig::new("r", url, 8 << 20)
    }
}

/// `kill -9` of the server: a migration back waits out the retries, then
/// the device fails; exactly its pages are lost (recorded so), the rest
/// read right.
#[test]
fn a_killed_server_fails_the_device_and_loses_only_its_pages() {
    if common::skip_without_uffd() || !have_redis() {
        return;
    }
    let mut server = Server::unix(&[]);
    let hmm = Hmm::new().unwrap();
    let dev = RedisDevice::new(&hmm, quick(&server.url)).unwrap();
    let (r, want) = filled(&hmm, 64);
    // Odd pages to Redis, even pages stay.
    for p in (1..64).step_by(2) {
        dev.migrate_to_device(r.pages_range(p, 1).unwrap()).unwrap();
    }
    server.kill();
    let rep = dev.migrate_to_system(r.range()).unwrap();
    assert_eq!(rep.migrated, 0, "nothing comes back from a dead server");
    common::eventually("the device failed", || dev.stats().failed);
    common::eventually("its pages recorded lost", || {
        r.residencies().iter().enumerate().all(|(p, x)| (*x == Residency::Poisoned) == (p % 2 == 1))
    });
    // Zero pages are a flag here: they are lost with the device too.
    assert_eq!(right_or_lost(&r, &want), 32, "exactly the device's pages");
}

/// `kill -9` of the server mid-fault-back: the touching thread gets
/// `SIGBUS` (in a child process of the test, with its own instance).
#[test]
fn a_touch_of_a_page_on_a_killed_server_gets_sigbus() {
    if common::skip_without("event-fork") || !have_redis() {
        return;
    }
    let _fork = common::fork_lock();
    let server = Server::unix(&[]);
    let pid = server.child.as_ref().unwrap().id();
    let url = server.url.clone();
    let child = spawn_child(move || {
        let Ok(hmm) = Hmm::new() else { return 2 };
        let Ok(dev) = RedisDevice::new(&hmm, quick(&url)) else { return 3 };
        let (r, _) = filled(&hmm, 8);
        if dev.migrate_to_device(r.range()).map_or(true, |rep| rep.migrated != 8) {
            return 4;
        }
        if !Command::new("kill").args(["-9", &pid.to_string()]).status().is_ok_and(|s| s.success())
        {
            return 5;
        }
        // Page 1 holds data (page 3 is a zero page): its touch must not return.
        std::hint::black_box(r.touch_read(PAGE_SIZE).unwrap_or(0));
        6
    })
    .unwrap();
    assert_eq!(
        child.wait_within(common::CHILD_LIMIT).unwrap(),
        ChildOutcome::Signaled(7),
        "SIGBUS on the lost page"
    );
}

/// A server that lost its data (flushed, or restarted empty) fails the
/// device: its pages are never read back as zeros.
#[test]
fn a_server_that_lost_its_data_fails_the_device_instead_of_reading_zeros() {
    if common::skip_without_uffd() || !have_redis() {
        return;
    }
    let mut server = Server::unix(&[]);
    for restart in [false, true] {
        let hmm = Hmm::new().unwrap();
        let dev = RedisDevice::new(&hmm, quick(&server.url)).unwrap();
        let (r, want) = filled(&hmm, 32);
        dev.migrate_to_device(r.range()).unwrap();
        if restart {
            server.kill();
            server.start();
        } else {
            let _: () = redis::cmd("FLUSHALL").query(&mut server.conn()).unwrap();
        }
        let rep = dev.migrate_to_system(r.range()).unwrap();
        assert!(rep.migrated < 32, "restart {restart}: pages came back from an empty server");
        common::eventually("the device failed", || dev.stats().failed);
        common::eventually("its pages recorded lost", || {
            r.residencies().iter().all(|x| matches!(x, Residency::Poisoned | Residency::System))
        });
        let lost = right_or_lost(&r, &want);
        assert!(lost > 0, "restart {restart}: none lost");
    }
}

/// `kill -9` while a large migration is under way: pages whose `SET` did
/// not complete stay in system memory; pages stored are lost with the
/// device; none reads wrong.
#[test]
fn a_server_killed_mid_migration_keeps_the_sources_not_yet_stored() {
    if common::skip_without_uffd() || !have_redis() {
        return;
    }
    let mut server = Server::unix(&[]);
    let hmm = Hmm::new().unwrap();
    let cfg = RedisConfig { batch_pages: 64, ..quick(&server.url) };
    let dev = RedisDevice::new(&hmm, RedisConfig { capacity: 64 << 20, ..cfg }).unwrap();
    let pages = 8192;
    let (r, want) = filled(&hmm, pages);
    let rep = std::thread::scope(|s| {
        let m = s.spawn(|| dev.migrate_to_device(r.range()).unwrap());
        common::eventually("some pages stored", || dev.stats().stored_pages > 0);
        server.kill();
        m.join().unwrap()
    });
    let lost = right_or_lost(&r, &want);
    assert!(lost <= rep.migrated, "only pages that moved are lost: {lost} of {}", rep.migrated);
    // The reads' fault-around windows are recorded when they end.
    hmm.settle(Duration::from_secs(10)).unwrap();
    assert!(r.residencies().iter().all(|x| matches!(x, Residency::System | Residency::Poisoned)));
}

/// Three nodes on loopback in a cluster: the pages spread over all of them
/// and come back.
#[test]
fn a_cluster_shards_the_pages_over_its_nodes() {
    if common::skip_without_uffd() || !have_redis() {
        return;
    }
    let nodes: Vec<Server> = (0..3).map(|_| Server::cluster_node()).collect();
    let mut create = Command::new("redis-cli");
    create.args(["--cluster", "create"]);
    for n in &nodes {
        create.arg(format!("127.0.0.1:{}", n.port.unwrap()));
    }
    create.args(["--cluster-replicas", "0", "--cluster-yes"]);
    let out = common::output_within(&mut create, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "redis-cli --cluster create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state_ok = |n: &Server| {
        redis::cmd("CLUSTER")
            .arg("INFO")
            .query::<String>(&mut n.conn())
            .is_ok_and(|t| t.contains("cluster_state:ok"))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !nodes.iter().all(state_ok) {
        assert!(Instant::now() < deadline, "the cluster did not come up within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let hmm = Hmm::new().unwrap();
    let urls = nodes.iter().map(|n| n.url.clone()).collect();
    let dev = RedisDevice::new(&hmm, RedisConfig::cluster("c", urls, 8 << 20)).unwrap();
    let (r, want) = filled(&hmm, 1024);
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 1024);
    for n in &nodes {
        let size: usize = redis::cmd("DBSIZE").query(&mut n.conn()).unwrap();
        assert!(size > 100, "node {} holds {size} keys: the pages are not spread", n.url);
    }
    let got = common::cpu_bytes(&r);
    assert_eq!(common::first_wrong_page(&got, &want), None);
}

/// Device pages freed and at once used again, before the background
/// thread deleted their keys: the deletes do not reach the new data.
#[test]
fn a_reused_device_page_keeps_its_new_data_when_the_old_key_is_deleted() {
    if common::skip_without_uffd() || !have_redis() {
        return;
    }
    let server = Server::unix(&[]);
    let hmm = Hmm::new().unwrap();
    // Room for 64 pages: the second round reuses the first round's pages.
    let dev = RedisDevice::new(&hmm, RedisConfig::new("r", &server.url, 64 * PAGE_SIZE)).unwrap();
    for round in 0..5 {
        let (r, _) = filled(&hmm, 64);
        let second: Vec<u8> =
            (0..64 * PAGE_SIZE).map(|i| (i / PAGE_SIZE + round) as u8 | 1).collect();
        r.write(0, &second).unwrap();
        assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 64, "round {round}");
        common::eventually("the freed keys deleted", || dev.stats().pending_deletes == 0);
        let got = common::cpu_bytes(&r);
        assert_eq!(common::first_wrong_page(&got, &second), None, "round {round}");
        assert!(!dev.stats().failed, "round {round}");
        drop(r);
    }
}

/// Values compressed with the compressed tier's codec: the server holds
/// fewer bytes than the pages, and every page comes back (incompressible
/// ones stored as they are).
#[test]
fn compressed_values_take_less_of_the_server_and_come_back() {
    if common::skip_without_uffd() || !have_redis() {
        return;
    }
    let server = Server::unix(&[]);
    for algorithm in [hmm_compressed::Algorithm::Lz4, hmm_compressed::Algorithm::Zstd { level: 3 }]
    {
        let hmm = Hmm::new().unwrap();
        let cfg = RedisConfig::new("r", &server.url, 4 << 20).with_compression(algorithm);
        let dev = RedisDevice::new(&hmm, cfg).unwrap();
        // Half text (compressible), half random (stored as it is).
        let pages = 128;
        let r = hmm.alloc(pages * PAGE_SIZE).unwrap();
        let want: Vec<u8> = (0..pages)
            .flat_map(|i| match i % 2 {
                0 => format!("page {i} compresses well; ").repeat(200).into_bytes()[..PAGE_SIZE]
                    .to_vec(),
                _ => page(i),
            })
            .collect();
        r.write(0, &want).unwrap();
        assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, pages, "{algorithm}");
        let mut c = server.conn();
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("{}*", dev.key_prefix())).query(&mut c).unwrap();
        let bytes: usize = keys
            .iter()
            .filter(|k| !k.ends_with("epoch"))
            .map(|k| redis::cmd("STRLEN").arg(k).query::<usize>(&mut c).unwrap())
            .sum();
        assert!(bytes < pages * PAGE_SIZE * 3 / 4, "{algorithm}: {bytes} bytes for {pages} pages");
        let got = common::cpu_bytes(&r);
        assert_eq!(common::first_wrong_page(&got, &want), None, "{algorithm}");
    }
}

/// A second process on the same server sees none of the first's keys: a
/// forked child makes a device of its own there, finds no key under the
/// parent's prefix that is its own, and the parent's pages are untouched.
#[test]
fn a_second_process_on_the_same_server_sees_none_of_the_first_keys() {
    if common::skip_without("event-fork") || !have_redis() {
        return;
    }
    let _fork = common::fork_lock();
    let server = Server::unix(&[]);
    let hmm = Hmm::new().unwrap();
    let dev = RedisDevice::new(&hmm, RedisConfig::new("parent", &server.url, 1 << 20)).unwrap();
    let (r, want) = filled(&hmm, 32);
    dev.migrate_to_device(r.range()).unwrap();
    let parent_prefix = dev.key_prefix().to_string();
    let parent_keys = server.keys(&parent_prefix);
    let url = server.url.clone();
    let child = spawn_child(move || {
        let Ok(h) = Hmm::new() else { return 2 };
        let Ok(d) = RedisDevice::new(&h, RedisConfig::new("child", &url, 1 << 20)) else {
            return 3;
        };
        if d.key_prefix() == parent_prefix {
            return 4;
        }
        let Ok(r) = h.alloc(16 * PAGE_SIZE) else { return 5 };
        if r.fill(0, r.len(), 0x77).is_err()
            || d.migrate_to_device(r.range()).map_or(true, |x| x.migrated != 16)
        {
            return 6;
        }
        let mut b = vec![0u8; r.len()];
        if r.read(0, &mut b).is_err() || b.iter().any(|x| *x != 0x77) {
            return 7;
        }
        0
    })
    .unwrap();
    assert_eq!(
        child.wait_within(common::CHILD_LIMIT).unwrap(),
        ChildOutcome::Exited(0),
        "2-7: see the child"
    );
    assert_eq!(
        server.keys(dev.key_prefix()),
        parent_keys,
        "the child touched none of the parent's keys"
    );
    let got = common::cpu_bytes(&r);
    assert_eq!(common::first_wrong_page(&got, &want), None);
}

/// A TLS server (`rediss://`, a certificate of a test authority): with the
/// authority given, pages round trip; without it, creation says the
/// certificate is not trusted and what to give.
#[test]
fn a_tls_server_is_used_with_its_certificate_authority_and_refused_without() {
    if common::skip_without_uffd() || !have_redis() {
        return;
    }
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("hmm-redis-tls-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sh = |script: &str| {
        let out = common::output_within(
            Command::new("sh").arg("-c").arg(script).current_dir(&dir),
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let have_openssl =
        Command::new("openssl").arg("version").stdout(Stdio::null()).status().is_ok();
    if !have_openssl {
        eprintln!("SKIP: no openssl to make the test's certificates");
        return;
    }
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    sh(&format!("openssl req -x509 {ec} -keyout ca.key -out ca.crt -days 1 -subj /CN=hmm-test-ca"));
    sh(&format!("openssl req {ec} -keyout server.key -out server.csr -subj /CN=127.0.0.1"));
    sh("printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext && \
        openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 1 -extfile ext");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let arg = |f: &str| dir.join(f).display().to_string();
    let mut server = Server {
        child: None,
        dir: dir.clone(),
        args: vec![
            "--port".into(),
            "0".into(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            arg("server.crt"),
            "--tls-key-file".into(),
            arg("server.key"),
            "--tls-ca-cert-file".into(),
            arg("ca.crt"),
            "--tls-auth-clients".into(),
            "no".into(),
        ],
        url: format!("rediss://127.0.0.1:{port}"),
        port: Some(port),
    };
    // Started by hand: the helper's readiness check speaks plain Redis.
    server.child = Some(
        hmm_redis::server_command()
            .args(&server.args)
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let hmm = Hmm::new().unwrap();
    let trusted = RedisConfig {
        tls_ca: Some(dir.join("ca.crt")),
        ..RedisConfig::new("tls", &server.url, 1 << 20)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let dev = loop {
        match RedisDevice::new(&hmm, trusted.clone()) {
            Ok(d) => break d,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("the TLS server did not take the device within 10 s: {e}"),
        }
    };
    let (r, want) = filled(&hmm, 32);
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 32);
    let got = common::cpu_bytes(&r);
    assert_eq!(common::first_wrong_page(&got, &want), None);
    match RedisDevice::new(&hmm, RedisConfig::new("tls", &server.url, 1 << 20)) {
        Err(HmmError::Config(m)) => {
            assert!(m.contains("certificate") && m.contains("tls_ca"), "{m}")
        }
        other => panic!("an untrusted certificate: {other:?}"),
    }
    drop(dev);
    server.kill();
}
