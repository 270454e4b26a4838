//! The kernel capability probe.
//!
//! [`probe`] finds out, once per process, what this kernel and this process's
//! privileges offer hmm: how a userfaultfd can be had, which userfaultfd features
//! and ioctls work (each tried on a scratch mapping, not just read from a bitmask),
//! whether `PAGEMAP_SCAN`, `MADV_POPULATE_*`, `MREMAP_DONTUNMAP` and memfd work,
//! and what huge pages the machine has. The result is cached; nothing here runs
//! in a fault path.
//!
//! Each [`Feature`] says what hmm uses it for and what is disabled without it.
//! [`Probe::verdict`] sums it up: ready, ready with some parts disabled, or
//! unusable with the reason and the fix.

use std::sync::OnceLock;

use serde::Serialize;

use crate::addr::PAGE_SIZE;
use crate::os::mm::{Advise, Mapping, Memfd, Protection};
use crate::os::pagemap;
use crate::os::process;
use crate::os::uffd::{
    self, CreateAttempts, Features, Ioctls, RegisterMode, Uffd, UffdError, UffdOptions, UffdOrigin,
};

/// One capability: whether it is present, what it is for, what its absence disables.
#[derive(Debug, Clone, Serialize)]
pub struct Feature {
    /// Short name (a kernel feature or call).
    pub name: &'static str,
    /// Whether this kernel and process have it.
    pub present: bool,
    /// Whether hmm cannot run without it.
    pub required: bool,
    /// What hmm uses it for.
    pub used_for: &'static str,
    /// What is disabled (or refused) when it is missing.
    pub if_missing: &'static str,
    /// Extra facts: the errno seen, a value read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// How a userfaultfd could be obtained.
#[derive(Debug, Clone, Serialize)]
pub struct UffdAccess {
    /// "syscall", "dev-node", "user-mode-only", or "none".
    pub origin: &'static str,
    /// Raw `UFFDIO_API` feature bits offered by the kernel.
    pub api_features: u64,
    /// Names of those features.
    pub api_feature_names: Vec<String>,
    /// What each creation path returned, when one failed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<String>,
}

/// The overall answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum Verdict {
    /// Everything hmm uses is there.
    Ready,
    /// hmm runs; the named optional features are missing.
    Degraded {
        /// The missing optional features.
        missing: Vec<String>,
    },
    /// hmm cannot run here.
    Unusable {
        /// What is wrong.
        reason: String,
        /// How to fix it.
        fix: String,
    },
}

/// Everything the probe found.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// `uname -r`.
    pub kernel_release: String,
    /// System page size.
    pub page_size: usize,
    /// Effective uid 0.
    pub root: bool,
    /// `vm.unprivileged_userfaultfd`, if readable.
    pub unprivileged_userfaultfd: Option<u32>,
    /// The `Seccomp:` mode of this process (0 none, 1 strict, 2 filter), if readable.
    pub seccomp_mode: Option<u32>,
    /// Transparent huge page mode (`always`, `madvise`, `never`), if readable.
    pub thp_mode: Option<String>,
    /// Free 2 MiB hugetlb pages.
    pub hugetlb_free_2m: Option<u64>,
    /// userfaultfd access.
    pub uffd: UffdAccess,
    /// Every capability, in the order `hmm check` shows them.
    pub features: Vec<Feature>,
    /// The sum of it all.
    pub verdict: Verdict,
}

static PROBE: OnceLock<Probe> = OnceLock::new();

/// The probe of this process (run on first use, then cached).
pub fn probe() -> &'static Probe {
    PROBE.get_or_init(run_probe)
}

impl Probe {
    /// Whether a named capability is present.
    pub fn has(&self, name: &str) -> bool {
        self.features.iter().any(|f| f.name == name && f.present)
    }

    /// `Ok` if hmm can run here (possibly degraded), else the reason and fix.
    pub fn usable(&self) -> Result<(), (String, String)> {
        match &self.verdict {
            Verdict::Unusable { reason, fix } => Err((reason.clone(), fix.clone())),
            _ => Ok(()),
        }
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn seccomp_mode() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("Seccomp:")).and_then(|v| v.trim().parse().ok())
}

fn thp_mode() -> Option<String> {
    // The active mode is the bracketed word: "always [madvise] never".
    let s = read_trimmed("/sys/kernel/mm/transparent_hugepage/enabled")?;
    let start = s.find('[')?;
    let end = s[start..].find(']')? + start;
    Some(s[start + 1..end].to_string())
}

struct Scratch {
    range_ioctls: Option<Ioctls>,
    wp_register: Result<(), String>,
    move_ok: Result<(), String>,
    poison_ok: Result<(), String>,
    minor_shmem: Result<(), String>,
}

/// Tries the registration modes and fill ioctls on scratch mappings.
fn try_ioctls(uffd: &Uffd) -> Scratch {
    let fail = |e: &dyn std::fmt::Display| Err(e.to_string());
    let mut s = Scratch {
        range_ioctls: None,
        wp_register: Err("not tried".into()),
        move_ok: Err("not tried".into()),
        poison_ok: Err("not tried".into()),
        minor_shmem: Err("not tried".into()),
    };
    let Ok(dst) = Mapping::anonymous(2 * PAGE_SIZE, Protection::ReadWrite) else { return s };
    match uffd.register(&dst, dst.range(), RegisterMode::MISSING | RegisterMode::WP) {
        Ok(io) => {
            s.range_ioctls = Some(io);
            s.wp_register = Ok(());
        }
        Err(e) => {
            s.wp_register = fail(&e);
            s.range_ioctls = uffd.register(&dst, dst.range(), RegisterMode::MISSING).ok();
        }
    }
    if s.range_ioctls.is_some() {
        s.move_ok = (|| {
            let src =
                Mapping::anonymous(PAGE_SIZE, Protection::ReadWrite).map_err(|e| e.to_string())?;
            src.fill(0, PAGE_SIZE, 0xA5).map_err(|e| e.to_string())?;
            let page = dst.subrange(0, PAGE_SIZE).map_err(|e| e.to_string())?;
            uffd.move_pages(page, &src, src.range(), false, false).map_err(|e| e.to_string())?;
            Ok(())
        })();
        s.poison_ok = dst
            .subrange(PAGE_SIZE, PAGE_SIZE)
            .map_err(|e| e.to_string())
            .and_then(|p| uffd.poison(p, false).map(drop).map_err(|e| e.to_string()));
        // Unregister before `dst` is unmapped (the poisoned page is never touched).
        let _ = uffd.unregister(dst.range());
    }
    s.minor_shmem = (|| {
        let f = Memfd::create(c"hmm-probe", PAGE_SIZE as u64, false).map_err(|e| e.to_string())?;
        let m = f.map(0, PAGE_SIZE, Protection::ReadWrite, true).map_err(|e| e.to_string())?;
        uffd.register(&m, m.range(), RegisterMode::MINOR).map_err(|e| e.to_string())?;
        uffd.unregister(m.range()).map_err(|e| e.to_string())
    })();
    s
}

fn origin_name(o: UffdOrigin) -> &'static str {
    match o {
        UffdOrigin::Syscall => "syscall",
        UffdOrigin::DevNode => "dev-node",
        UffdOrigin::UserModeOnly => "user-mode-only",
    }
}

fn attempts_text(a: &CreateAttempts) -> Vec<String> {
    let mut v =
        vec![format!("userfaultfd(2): {}", a.syscall), format!("/dev/userfaultfd: {}", a.dev_node)];
    if let Some(e) = a.user_mode_only {
        v.push(format!("userfaultfd(UFFD_USER_MODE_ONLY): {e}"));
    }
    v
}

/// The userfaultfd features hmm asks for when the kernel has them.
pub const WANTED_FEATURES: Features = Features::from_bits(
    Features::EVENTS.bits()
        | Features::PAGEFAULT_FLAG_WP.bits()
        | Features::THREAD_ID.bits()
        | Features::POISON.bits()
        | Features::MOVE.bits()
        | Features::MISSING_SHMEM.bits()
        | Features::MINOR_SHMEM.bits()
        | Features::WP_UNPOPULATED.bits()
        | Features::WP_HUGETLBFS_SHMEM.bits(),
);

/// The userfaultfd features without which hmm does not run.
pub const REQUIRED_FEATURES: Features = Features::from_bits(
    Features::EVENT_REMAP.bits()
        | Features::EVENT_REMOVE.bits()
        | Features::EVENT_UNMAP.bits()
        | Features::POISON.bits(),
);

fn run_probe() -> Probe {
    let kernel_release = process::kernel_release();
    let page_size = process::page_size();
    let root = process::is_root();
    let unprivileged_userfaultfd =
        read_trimmed("/proc/sys/vm/unprivileged_userfaultfd").and_then(|s| s.parse().ok());
    let seccomp = seccomp_mode();
    let hugetlb_free_2m = read_trimmed("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .and_then(|s| s.parse().ok());

    let api = uffd::probe_api(true);
    let attempts = match &api {
        Err(UffdError::Unavailable(a)) => Some(a.clone()),
        _ => None,
    };
    let (access, api_features, origin, create_err) = match &api {
        Ok(info) => (
            UffdAccess {
                origin: origin_name(info.origin),
                api_features: info.features.bits(),
                api_feature_names: info.features.names(),
                attempts: info.refused.map_or_else(Vec::new, |(syscall, dev_node)| {
                    attempts_text(&CreateAttempts { syscall, dev_node, user_mode_only: None })
                }),
            },
            info.features,
            Some(info.origin),
            None,
        ),
        Err(e) => {
            let attempts = match e {
                UffdError::Unavailable(a) => attempts_text(a),
                other => vec![other.to_string()],
            };
            (
                UffdAccess {
                    origin: "none",
                    api_features: 0,
                    api_feature_names: Vec::new(),
                    attempts,
                },
                Features::NONE,
                None,
                Some(e.to_string()),
            )
        }
    };

    // EVENT_FORK needs CAP_SYS_PTRACE: ask for it alone on a fresh descriptor.
    let fork_permitted = api_features.contains(Features::EVENT_FORK)
        && Uffd::open(UffdOptions { required: Features::EVENT_FORK, ..UffdOptions::default() })
            .is_ok();
    let scratch_uffd = origin.and_then(|_| {
        let wanted = if fork_permitted {
            WANTED_FEATURES
        } else {
            WANTED_FEATURES.difference(Features::EVENT_FORK)
        };
        Uffd::open(UffdOptions { wanted, ..UffdOptions::default() }).ok()
    });
    let scratch = scratch_uffd.as_ref().map(try_ioctls);
    let range_ioctls = scratch.as_ref().and_then(|s| s.range_ioctls).unwrap_or_default();

    let has = |f: Features| api_features.contains(f);
    let result_detail = |r: Option<&Result<(), String>>| match r {
        Some(Err(e)) => Some(e.clone()),
        _ => None,
    };
    let ok = |r: Option<&Result<(), String>>| matches!(r, Some(Ok(())));

    let pagemap_scan = pagemap::scan_supported();
    let populate = Mapping::anonymous(PAGE_SIZE, Protection::ReadWrite)
        .map_err(|e| e.to_string())
        .and_then(|m| m.advise(m.range(), Advise::PopulateWrite).map_err(|e| e.to_string()));
    let dontunmap = Mapping::anonymous(PAGE_SIZE, Protection::ReadWrite)
        .map_err(|e| e.to_string())
        .and_then(|m| m.remap_dontunmap().map(drop).map_err(|e| e.to_string()));
    let memfd =
        Memfd::create(c"hmm-probe", PAGE_SIZE as u64, false).map(drop).map_err(|e| e.to_string());

    let kernel_faults = origin.is_some_and(UffdOrigin::handles_kernel_faults);
    let mut features = vec![
        Feature {
            name: "userfaultfd",
            present: kernel_faults,
            required: true,
            used_for: "CPU faults on device-resident pages reach hmm's fault service",
            if_missing: "everything: hmm cannot run",
            detail: match (origin, &create_err) {
                (Some(o), _) if !kernel_faults => Some(format!(
                    "only a {} descriptor could be had: it does not see faults taken inside \
                     system calls, so read(2) into device-resident memory would fail",
                    origin_name(o)
                )),
                (Some(o), _) => Some(format!("obtained through {}", origin_name(o))),
                (None, Some(e)) => Some(e.clone()),
                _ => None,
            },
        },
        Feature {
            name: "missing-mode",
            present: range_ioctls.contains(Ioctls::COPY | Ioctls::ZEROPAGE | Ioctls::WAKE),
            required: true,
            used_for: "register managed ranges; resolve faults with UFFDIO_COPY / ZEROPAGE / WAKE",
            if_missing: "everything: hmm cannot run",
            detail: None,
        },
    ];
    let event = |name, f: Features, used_for, if_missing, required| Feature {
        name,
        present: has(f),
        required,
        used_for,
        if_missing,
        detail: None,
    };
    features.push(event(
        "event-unmap",
        Features::EVENT_UNMAP,
        "munmap of a managed range frees its device pages and invalidates mirrors",
        "everything: device pages would leak and mirrors go stale",
        true,
    ));
    features.push(event(
        "event-remove",
        Features::EVENT_REMOVE,
        "MADV_DONTNEED / MADV_REMOVE invalidate mirrors and free device pages",
        "everything: mirrors would go stale",
        true,
    ));
    features.push(event(
        "event-remap",
        Features::EVENT_REMAP,
        "mremap of a managed range moves its page records and invalidates mirrors",
        "everything: mirrors would go stale",
        true,
    ));
    features.push(Feature {
        name: "poison",
        present: has(Features::POISON) && ok(scratch.as_ref().map(|s| &s.poison_ok)),
        required: true,
        used_for: "pages of a failed device end in SIGBUS on CPU touch (UFFDIO_POISON)",
        if_missing: "everything: a device failure could not be reported to the CPU (Linux 6.6+)",
        detail: result_detail(scratch.as_ref().map(|s| &s.poison_ok)),
    });
    features.push(Feature {
        name: "event-fork",
        present: fork_permitted,
        required: false,
        used_for: "fork of a process with device-resident pages: the child gets a copy of them",
        if_missing: "a child forked while pages live on a device reads zeros where they \
                     are (the FORK event needs CAP_SYS_PTRACE)",
        detail: (has(Features::EVENT_FORK) && !fork_permitted).then(|| {
            "the kernel has it but refuses it to this process (CAP_SYS_PTRACE)".to_string()
        }),
    });
    features.push(Feature {
        name: "move",
        present: has(Features::MOVE) && ok(scratch.as_ref().map(|s| &s.move_ok)),
        required: false,
        used_for: "zero-copy migration of anonymous pages (UFFDIO_MOVE)",
        if_missing: "zero-copy moves: pages are copied instead (Linux 6.8+)",
        detail: result_detail(scratch.as_ref().map(|s| &s.move_ok)),
    });
    features.push(Feature {
        name: "sigbus-mode",
        present: has(Features::SIGBUS) && crate::os::sigbus::reports_access(),
        required: false,
        used_for: "FaultMode::InThread: a CPU fault served in the faulting thread itself \
                   (UFFD_FEATURE_SIGBUS and the fault's access type, which x86-64 reports)",
        if_missing: "FaultMode::InThread: instances serve faults on the fault service thread",
        detail: (has(Features::SIGBUS) && !crate::os::sigbus::reports_access()).then(|| {
            "the kernel has it, but this architecture does not report a fault's \
                      access type to the handler"
                .to_string()
        }),
    });
    features.push(Feature {
        name: "write-protect",
        present: has(Features::PAGEFAULT_FLAG_WP) && ok(scratch.as_ref().map(|s| &s.wp_register)),
        required: false,
        used_for: "read-only device mirrors, exclusive access, write tracking (WP mode)",
        if_missing: "exclusive device access and write tracking",
        detail: result_detail(scratch.as_ref().map(|s| &s.wp_register)),
    });
    features.push(event(
        "wp-unpopulated",
        Features::WP_UNPOPULATED,
        "write-protect pages that were never touched",
        "write tracking of untouched pages (they are populated first)",
        false,
    ));
    features.push(event(
        "wp-async",
        Features::WP_ASYNC,
        "dirty tracking without a fault per write (with PAGEMAP_SCAN)",
        "asynchronous write tracking: synchronous WP faults are used",
        false,
    ));
    features.push(event(
        "thread-id",
        Features::THREAD_ID,
        "attribute each CPU fault to its thread in traces",
        "per-thread fault attribution",
        false,
    ));
    features.push(event(
        "missing-shmem",
        Features::MISSING_SHMEM,
        "fault service on shared memory and memfd mappings",
        "mirroring shared mappings through faults",
        false,
    ));
    features.push(Feature {
        name: "minor-shmem",
        present: has(Features::MINOR_SHMEM) && ok(scratch.as_ref().map(|s| &s.minor_shmem)),
        required: false,
        used_for: "coherent device memory backed by memfd (UFFDIO_CONTINUE)",
        if_missing: "fault-driven mapping of coherent device memory",
        detail: result_detail(scratch.as_ref().map(|s| &s.minor_shmem)),
    });
    features.push(Feature {
        name: "pagemap-scan",
        present: matches!(pagemap_scan, Ok(true)),
        required: false,
        used_for: "page-table snapshots behind range_fault and residency maps (PAGEMAP_SCAN)",
        if_missing: "fast snapshots: per-page /proc/self/pagemap reads are used (Linux 6.7+)",
        detail: pagemap_scan.err().map(|e| e.to_string()),
    });
    features.push(Feature {
        name: "madv-populate",
        present: populate.is_ok(),
        required: false,
        used_for: "fault CPU pages in for a device (MADV_POPULATE_READ / _WRITE)",
        if_missing: "device faults that need CPU pages populated (Linux 5.14+)",
        detail: populate.err(),
    });
    features.push(Feature {
        name: "mremap-dontunmap",
        present: dontunmap.is_ok(),
        required: false,
        used_for: "moving a range's pages while keeping the range mapped",
        if_missing: "MREMAP_DONTUNMAP of managed ranges (Linux 5.7+)",
        detail: dontunmap.err(),
    });
    features.push(Feature {
        name: "memfd",
        present: memfd.is_ok(),
        required: false,
        used_for: "coherent device memory the CPU maps directly",
        if_missing: "coherent device memory",
        detail: memfd.err(),
    });
    features.push(Feature {
        name: "hugetlb",
        present: hugetlb_free_2m.is_some_and(|n| n > 0),
        required: false,
        used_for: "hugetlbfs ranges (2 MiB pages reserved by root in vm.nr_hugepages)",
        if_missing: "hugetlbfs ranges and their tests",
        detail: Some(match hugetlb_free_2m {
            Some(n) => format!("{n} free 2 MiB pages"),
            None => "no 2 MiB hugetlb pool".to_string(),
        }),
    });
    let thp = thp_mode();
    features.push(Feature {
        name: "transparent-hugepages",
        present: matches!(thp.as_deref(), Some("always" | "madvise")),
        required: false,
        used_for: "2 MiB migrations of transparent huge pages",
        if_missing: "huge-page-sized moves: ranges move as 4 KiB pages",
        detail: thp.as_ref().map(|m| format!("mode: {m}")),
    });

    let verdict = verdict(
        &features,
        origin,
        attempts.as_ref(),
        page_size,
        root,
        unprivileged_userfaultfd,
        seccomp,
        &kernel_release,
    );
    Probe {
        kernel_release,
        page_size,
        root,
        unprivileged_userfaultfd,
        seccomp_mode: seccomp,
        thp_mode: thp,
        hugetlb_free_2m,
        uffd: access,
        features,
        verdict,
    }
}

/// Sums the features up into a verdict, explaining the commonest failures.
#[allow(clippy::too_many_arguments)]
pub(crate) fn verdict(
    features: &[Feature],
    origin: Option<UffdOrigin>,
    create: Option<&CreateAttempts>,
    page_size: usize,
    root: bool,
    unprivileged: Option<u32>,
    seccomp: Option<u32>,
    kernel: &str,
) -> Verdict {
    if page_size != PAGE_SIZE {
        return Verdict::Unusable {
            reason: format!(
                "the system page size is {page_size} bytes; hmm works with {PAGE_SIZE}-byte pages"
            ),
            fix: "run on a kernel configured with 4 KiB pages".into(),
        };
    }
    let permission_fix = "run as root, or `sysctl -w vm.unprivileged_userfaultfd=1`, or give this user \
         read-write access to /dev/userfaultfd (Linux 6.1+)";
    match origin {
        None => {
            let err = create
                .map_or_else(|| "no userfaultfd".to_string(), |a| attempts_text(a).join("; "));
            let no_syscall = create.is_some_and(|a| a.syscall == rustix::io::Errno::NOSYS);
            let (reason, fix) = if seccomp == Some(2) {
                (
                    format!("userfaultfd is blocked, most likely by this process's seccomp filter ({err})"),
                    "run outside the sandbox, or allow the userfaultfd system call and ioctls in its seccomp profile"
                        .to_string(),
                )
            } else if no_syscall {
                (
                    format!("this kernel ({kernel}) has no userfaultfd ({err})"),
                    "use a kernel built with CONFIG_USERFAULTFD=y, Linux 6.8 or later".to_string(),
                )
            } else {
                (format!("userfaultfd cannot be created ({err})"), permission_fix.to_string())
            };
            return Verdict::Unusable { reason, fix };
        }
        Some(UffdOrigin::UserModeOnly) => {
            let why = match (root, unprivileged) {
                (false, Some(0)) => {
                    "not root, vm.unprivileged_userfaultfd is 0 and /dev/userfaultfd is not accessible"
                }
                _ => "full userfaultfd is refused to this process",
            };
            return Verdict::Unusable {
                reason: format!(
                    "only user-mode-only userfaultfd is available ({why}): system calls that touch \
                     device-resident memory would fail with EFAULT instead of faulting the pages back"
                ),
                fix: permission_fix.to_string(),
            };
        }
        Some(_) => {}
    }
    let missing_required: Vec<&str> =
        features.iter().filter(|f| f.required && !f.present).map(|f| f.name).collect();
    if !missing_required.is_empty() {
        return Verdict::Unusable {
            reason: format!(
                "this kernel ({kernel}) lacks {} that hmm requires",
                missing_required.join(", ")
            ),
            fix: "use Linux 6.8 or later with CONFIG_USERFAULTFD=y".into(),
        };
    }
    let missing: Vec<String> =
        features.iter().filter(|f| !f.required && !f.present).map(|f| f.name.to_string()).collect();
    if missing.is_empty() { Verdict::Ready } else { Verdict::Degraded { missing } }
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustix::io::Errno;

    fn attempts(syscall: Errno) -> CreateAttempts {
        CreateAttempts { syscall, dev_node: Errno::NOENT, user_mode_only: Some(syscall) }
    }

    fn feature(name: &'static str, present: bool, required: bool) -> Feature {
        Feature { name, present, required, used_for: "", if_missing: "", detail: None }
    }

    #[test]
    fn verdict_explains_each_failure() {
        let all = [feature("userfaultfd", true, true), feature("move", true, false)];
        assert_eq!(
            verdict(&all, Some(UffdOrigin::Syscall), None, 4096, true, Some(0), Some(0), "6.18"),
            Verdict::Ready
        );

        let degraded = [feature("userfaultfd", true, true), feature("move", false, false)];
        assert_eq!(
            verdict(
                &degraded,
                Some(UffdOrigin::DevNode),
                None,
                4096,
                false,
                Some(0),
                Some(0),
                "6.6"
            ),
            Verdict::Degraded { missing: vec!["move".into()] }
        );

        let Verdict::Unusable { reason, fix } = verdict(
            &all,
            Some(UffdOrigin::UserModeOnly),
            None,
            4096,
            false,
            Some(0),
            Some(0),
            "6.18",
        ) else {
            panic!("user-mode-only must be unusable")
        };
        assert!(reason.contains("vm.unprivileged_userfaultfd is 0"), "{reason}");
        assert!(fix.contains("sysctl -w vm.unprivileged_userfaultfd=1"), "{fix}");

        let Verdict::Unusable { reason, fix } = verdict(
            &all,
            None,
            Some(&attempts(Errno::PERM)),
            4096,
            false,
            Some(0),
            Some(2),
            "6.18",
        ) else {
            panic!("blocked userfaultfd must be unusable")
        };
        assert!(reason.contains("seccomp"), "{reason}");
        assert!(fix.contains("seccomp profile"), "{fix}");

        let Verdict::Unusable { reason, .. } =
            verdict(&all, None, Some(&attempts(Errno::NOSYS)), 4096, true, None, Some(0), "4.4")
        else {
            panic!("a kernel without userfaultfd must be unusable")
        };
        assert!(reason.contains("has no userfaultfd"), "{reason}");

        let old = [feature("userfaultfd", true, true), feature("poison", false, true)];
        let Verdict::Unusable { reason, fix } =
            verdict(&old, Some(UffdOrigin::Syscall), None, 4096, true, Some(1), Some(0), "6.1")
        else {
            panic!("a kernel without a required feature must be unusable")
        };
        assert!(reason.contains("lacks poison"), "{reason}");
        assert!(fix.contains("6.8"), "{fix}");

        assert!(matches!(
            verdict(&all, Some(UffdOrigin::Syscall), None, 65536, true, None, None, "6.18"),
            Verdict::Unusable { .. }
        ));
    }
}
