//! The `hmm` program as a person or a script runs it.

#[path = "../../hmm/tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::Duration;

/// How long one run of the program may take (the longest, a short
/// benchmark or stress run in a debug build, takes up to a minute on a
/// loaded machine; nextest gives the whole test 4, see .config/nextest.toml).
const RUN_LIMIT: Duration = Duration::from_secs(200);

fn hmm(args: &[&str]) -> std::process::Output {
    common::output_within(Command::new(env!("CARGO_BIN_EXE_hmm")).args(args), RUN_LIMIT)
}

fn usable() -> bool {
    hmm::probe::probe().usable().is_ok()
}

#[test]
fn check_prints_a_table_and_its_exit_code_follows_the_verdict() {
    let out = hmm(&["check"]);
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in
        ["feature", "present", "used for", "userfaultfd", "move", "pagemap-scan", "verdict:"]
    {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert_eq!(out.status.success(), usable(), "{text}");
    if !usable() {
        assert!(text.contains("fix:"), "an unusable verdict says how to fix it:\n{text}");
    }
}

#[test]
fn check_json_lists_every_feature_with_its_purpose() {
    let out = hmm(&["check", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let features = v["features"].as_array().expect("features array");
    assert!(features.len() >= 15);
    for f in features {
        assert!(f["name"].is_string() && f["present"].is_boolean() && f["required"].is_boolean());
        assert!(!f["used_for"].as_str().unwrap().is_empty());
        assert!(!f["if_missing"].as_str().unwrap().is_empty());
    }
    assert!(v["kernel_release"].is_string());
    let status = v["verdict"]["status"].as_str().unwrap();
    assert!(["ready", "degraded", "unusable"].contains(&status));
    assert_eq!(out.status.success(), status != "unusable");
}

#[test]
fn bench_quick_json_prints_exactly_the_documented_keys() {
    let out = hmm(&["bench", "--quick", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.trim().lines().count(), 1, "one JSON object on one line: {text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let obj = v.as_object().unwrap();
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "checked_read_gbps",
            "coherent_cpu_read_gbps",
            "compressed_declined_share",
            "compressed_effective_ratio",
            "compressed_fault_back_in_thread_us_p50",
            "compressed_fault_back_in_thread_us_p99",
            "compressed_fault_back_seq_gbps",
            "compressed_fault_back_us_p50",
            "compressed_fault_back_us_p99",
            "compressed_program_declined_share",
            "compressed_program_effective_ratio",
            "compressed_program_ratio",
            "compressed_ratio",
            "device_access_gbps",
            "device_descriptor_bytes_per_page",
            "evict_gbps",
            "fault_back_in_thread_us_p50",
            "fault_back_in_thread_us_p99",
            "fault_back_random_around_us_p50",
            "fault_back_random_copy_us_p50",
            "fault_back_random_us_p50",
            "fault_back_random_us_p99",
            "fault_back_sequential_4k_gbps",
            "fault_back_sequential_gbps",
            "fork_with_device_pages_ms",
            "invalidate_us_p50",
            "kernel_first_touch_us",
            "memcpy_gbps",
            "metadata_bytes_per_page",
            "migrate_device_to_device_gbps",
            "migrate_to_coherent_gbps",
            "migrate_to_compressed_gbps",
            "migrate_to_device_4k_gbps",
            "migrate_to_device_gbps",
            "migrate_to_device_zero_copy_4k_gbps",
            "migrate_to_device_zero_copy_gbps",
            "migrate_to_redis_gbps",
            "migrate_to_system_4k_gbps",
            "migrate_to_system_gbps",
            "pagemap_scan_mpages_s",
            "range_fault_snapshot_mpages_s",
            "redis_fault_back_us_p50",
            "redis_fault_back_us_p99",
            "redis_get_us_p50",
            "redis_set_pipelined_gbps",
            "sigbus_roundtrip_us_p50",
            "sigbus_roundtrip_us_p99",
            "uffd_move_gbps",
            "uffd_roundtrip_us_p50",
            "uffd_roundtrip_us_p99",
            "zram_swapin_seq_gbps",
            "zram_swapin_us_p50",
            "zram_swapin_us_p99",
        ]
    );
    let num = |k: &str| obj[k].as_f64();
    assert!(num("memcpy_gbps").unwrap() > 0.0 && num("kernel_first_touch_us").unwrap() > 0.0);
    if usable() {
        let (p50, p99) =
            (num("uffd_roundtrip_us_p50").unwrap(), num("uffd_roundtrip_us_p99").unwrap());
        assert!(p50 > 0.0 && p99 >= p50, "p50 {p50} p99 {p99}");
        if hmm::probe::probe().has("move") {
            assert!(num("uffd_move_gbps").unwrap() > 0.0);
        }
        if hmm::probe::probe().has("pagemap-scan") {
            assert!(num("pagemap_scan_mpages_s").unwrap() > 0.0);
        }
        // The zram anchor is measured only when asked (`--zram`).
        assert!(obj["zram_swapin_us_p50"].is_null() && obj["zram_swapin_us_p99"].is_null());
        assert!(obj["zram_swapin_seq_gbps"].is_null());
        // A share of incompressible pages may be none at all.
        assert!(num("compressed_declined_share").is_some_and(|x| (0.0..=1.0).contains(&x)));
        // The program image needs python3 and root (ptrace rights).
        let python = std::process::Command::new("python3")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if python && hmm::probe::probe().root {
            assert!(num("compressed_program_ratio").is_some_and(|x| x > 1.0), "{obj:?}");
            assert!(
                num("compressed_program_declined_share").is_some_and(|x| (0.0..=1.0).contains(&x))
            );
        }
        // Every migration figure was measured (each pass moved every page).
        let fork = hmm::probe::probe().has("event-fork");
        for (k, v) in obj.iter().filter(|(k, _)| {
            !k.starts_with("uffd")
                && !k.starts_with("pagemap")
                && !k.starts_with("zram")
                && !k.ends_with("declined_share")
                && !k.contains("compressed_program")
                && !k.contains("redis")
                && (fork || !k.starts_with("fork"))
        }) {
            assert!(v.as_f64().is_some_and(|x| x > 0.0), "{k} = {v}");
        }
        // The Redis figures need redis-server (the bench starts its own).
        let redis = std::process::Command::new("redis-server")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok();
        for (k, v) in obj.iter().filter(|(k, _)| k.contains("redis")) {
            match redis {
                true => assert!(v.as_f64().is_some_and(|x| x > 0.0), "{k} = {v}"),
                false => assert!(v.is_null(), "{k} = {v} without redis-server"),
            }
        }
    }
}

#[test]
fn bench_table_names_every_key() {
    let out = hmm(&["bench", "--quick"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for key in [
        "memcpy_gbps",
        "kernel_first_touch_us",
        "uffd_roundtrip_us_p99",
        "uffd_move_gbps",
        "pagemap_scan_mpages_s",
        "checked_read_gbps",
        "device_access_gbps",
        "range_fault_snapshot_mpages_s",
        "invalidate_us_p50",
        "fork_with_device_pages_ms",
        "migrate_device_to_device_gbps",
        "coherent_cpu_read_gbps",
        "evict_gbps",
        "compressed_ratio",
        "compressed_fault_back_in_thread_us_p50",
    ] {
        assert!(text.contains(key), "{key} missing:\n{text}");
    }
    assert_columns_line_up(&text, "value");
}

/// Every row of the table that starts with the header holding `column` ends
/// that column where the header does: no cell overflows it.
fn assert_columns_line_up(text: &str, column: &str) {
    let mut lines = text.lines().skip_while(|l| !l.contains(column));
    let header = lines.next().unwrap_or_else(|| panic!("no header with {column:?}:\n{text}"));
    let end = header.find(column).unwrap() + column.len();
    let rows: Vec<&str> = lines.take_while(|l| !l.trim().is_empty()).collect();
    assert!(!rows.is_empty(), "no rows under the header:\n{text}");
    for row in rows {
        assert!(
            row.len() > end && row.as_bytes()[end] == b' ' && row.as_bytes()[end - 1] != b' ',
            "a cell does not end where {column:?} does:\n{header}\n{row}"
        );
    }
}

/// The demo at a small size: every check passes, and the report shows the
/// phases, the pages moved each way, the faults and the residency maps
/// (the tree on the device after placement, back in system memory after
/// the CPU walked it).
#[test]
fn demo_runs_the_workload_and_reports_it() {
    let out = hmm(&["demo", "--nodes", "20000", "--array-mib", "4", "--explain"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if !usable() {
        assert!(!out.status.success());
        assert!(err.contains("why:") && err.contains("fix:"), "{err}");
        return;
    }
    assert!(out.status.success(), "{text}\n{err}");
    assert!(text.contains("Migration to a device"), "--explain walks through it: {text}");
    assert!(text.contains("every result matches the CPU-only computation"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    for phase in ["build (CPU)", "place (hints to gpu0)", "device job", "read back (CPU)"] {
        assert!(text.contains(phase), "{phase} missing: {text}");
    }
    assert!(text.contains("pages migrated:") && text.contains("faults:"), "{text}");
    let map = |when: &str, name: &str| -> String {
        let at = text.find(when).unwrap_or_else(|| panic!("{when} missing: {text}"));
        let line = text[at..].lines().find(|l| l.trim_start().starts_with(name)).unwrap();
        line[line.find('[').unwrap() + 1..line.rfind(']').unwrap()].to_string()
    };
    assert!(map("after placement", "tree").chars().all(|c| c == '0'), "{text}");
    assert!(map("after the CPU read the results", "tree").chars().all(|c| c == 'S'), "{text}");
    assert!(map("after placement", "array").starts_with("SSSS"), "{text}");
}

#[test]
fn demo_on_the_compressed_tier_compresses_the_cold_part_and_gets_every_byte_back() {
    let out = hmm(&["demo", "--device", "compressed", "--nodes", "20000", "--array-mib", "4"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if !usable() {
        assert!(!out.status.success());
        return;
    }
    assert!(out.status.success(), "{text}\n{err}");
    assert!(text.contains("every byte came back as it was built"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    assert!(text.contains("compressed tier cold0") && text.contains("lz4"), "{text}");
    let map = |when: &str, name: &str| -> String {
        let at = text.find(when).unwrap_or_else(|| panic!("{when} missing: {text}"));
        let line = text[at..].lines().find(|l| l.trim_start().starts_with(name)).unwrap();
        line[line.find('[').unwrap() + 1..line.rfind(']').unwrap()].to_string()
    };
    // The log's last quarter stays; the rest, and the tree, go to the tier.
    assert!(map("after the move to the tier", "log").starts_with("0000"), "{text}");
    assert!(map("after the move to the tier", "log").ends_with("SSSS"), "{text}");
    assert!(map("after the CPU used the data", "log").chars().all(|c| c == 'S'), "{text}");
    assert!(map("after the CPU used the data", "tree").chars().all(|c| c == 'S'), "{text}");
    assert!(text.contains("x counting the allocator's waste"), "{text}");
}

#[test]
fn demo_on_the_redis_tier_moves_the_cold_part_and_gets_every_byte_back() {
    let have = std::process::Command::new("redis-server")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok();
    if !usable() || !have {
        eprintln!("SKIP: needs userfaultfd and redis-server (.ci/run installs it)");
        return;
    }
    let out = hmm(&["demo", "--device", "redis", "--nodes", "20000", "--array-mib", "4"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("Redis tier cold0") && text.contains("demo's own"), "{text}");
    assert!(text.contains("every byte came back as it was built"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    // A server that is not there: the reason, and no demo.
    let out = hmm(&[
        "demo",
        "--device",
        "redis=redis://127.0.0.1:1",
        "--nodes",
        "100",
        "--array-mib",
        "1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no Redis server answers"), "{err}");
}

#[test]
fn demo_refuses_an_unknown_device_with_the_choices() {
    let out = hmm(&["demo", "--device", "floppy"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("software") && err.contains("compressed") && err.contains("redis=URL"),
        "{err}"
    );
}

#[test]
fn demo_refuses_bad_sizes_with_the_reason() {
    let out = hmm(&["demo", "--nodes", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nodes"));
}

#[test]
fn unknown_subcommand_is_a_usage_error() {
    let out = hmm(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unrecognized subcommand"));
}

/// Runs `hmm check --json` as user `nobody` (needs root and `setpriv`): the real
/// failure path when the kernel withholds full userfaultfd from ordinary users.
#[test]
fn check_as_an_unprivileged_user_explains_what_is_missing_and_the_fix() {
    let probe = hmm::probe::probe();
    if !probe.root || !std::path::Path::new("/usr/bin/setpriv").exists() {
        eprintln!("SKIP: needs root and /usr/bin/setpriv to run hmm as another user");
        return;
    }
    let out = common::output_within(
        Command::new("/usr/bin/setpriv").args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_hmm"),
            "check",
            "--json",
        ]),
        RUN_LIMIT,
    );
    if out.stdout.is_empty() {
        eprintln!(
            "SKIP: user nobody cannot run the test binary: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["root"], false);
    let dev_open_to_all = std::fs::metadata("/dev/userfaultfd")
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o006 == 0o006)
        .unwrap_or(false);
    if probe.unprivileged_userfaultfd == Some(0) && !dev_open_to_all {
        assert_eq!(out.status.code(), Some(1), "an unusable kernel fails the check");
        assert_eq!(v["verdict"]["status"], "unusable");
        let reason = v["verdict"]["reason"].as_str().unwrap();
        let fix = v["verdict"]["fix"].as_str().unwrap();
        assert!(reason.contains("vm.unprivileged_userfaultfd is 0"), "{reason}");
        assert!(fix.contains("sysctl -w vm.unprivileged_userfaultfd=1"), "{fix}");
        assert!(fix.contains("/dev/userfaultfd"), "{fix}");
        // The fallback worked, and the check says why the better paths did not.
        assert_eq!(v["uffd"]["origin"], "user-mode-only");
        let attempts = v["uffd"]["attempts"].to_string();
        assert!(
            attempts.contains("userfaultfd(2)") && attempts.contains("/dev/userfaultfd"),
            "{attempts}"
        );
        // EVENT_FORK needs CAP_SYS_PTRACE even where userfaultfd itself is allowed.
        let feature = |name: &str| {
            v["features"].as_array().unwrap().iter().find(|f| f["name"] == name).unwrap().clone()
        };
        let fork = feature("event-fork");
        assert_eq!(fork["present"], false);
        // What is lost without it, in the user's terms.
        let lost = fork["if_missing"].as_str().unwrap();
        assert!(lost.contains("reads zeros"), "{lost}");
        // The descriptor that could be had is named as what it is, not as
        // userfaultfd "obtained".
        let uffd = feature("userfaultfd");
        let detail = uffd["detail"].as_str().unwrap();
        assert!(detail.contains("does not see faults taken inside system calls"), "{detail}");
    } else {
        assert!(out.status.success(), "ordinary users may use userfaultfd here");
    }
}

/// `hmm trace demo` writes a Chrome-trace file with the demo's phases and
/// hmm's migrations, faults and invalidations on named threads; an
/// unwritable destination is refused before anything runs.
#[test]
fn trace_of_the_demo_is_a_timeline() {
    let dir = std::env::temp_dir().join(format!("hmm-trace-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("demo.json");
    let out = hmm(&[
        "trace",
        "--out",
        path.to_str().unwrap(),
        "demo",
        "--nodes",
        "20000",
        "--array-mib",
        "4",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    if !usable() {
        assert!(!out.status.success(), "{err}");
        return;
    }
    assert!(out.status.success(), "{err}");
    assert!(err.contains("events") && err.contains("perfetto"), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let events = v["traceEvents"].as_array().unwrap();
    let cats: std::collections::BTreeSet<&str> =
        events.iter().filter_map(|e| e["cat"].as_str()).collect();
    for cat in ["phase", "migrate", "cpu-fault", "device-fault", "invalidate"] {
        assert!(cats.contains(cat), "no {cat} events: {cats:?}");
    }
    let phase = events.iter().find(|e| e["name"] == "device job (+ CPU meanwhile)").unwrap();
    assert!(phase["dur"].as_f64().unwrap() > 0.0);
    std::fs::remove_dir_all(&dir).unwrap();
    let out = hmm(&["trace", "--out", "/nonexistent-dir/t.json", "demo"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot write /nonexistent-dir/t.json"));
    // `--out` may follow the run's name too, as a reader of the help would
    // write it.
    let out = hmm(&["trace", "demo", "--out", "/nonexistent-dir/u.json"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot write /nonexistent-dir/u.json"));
}

/// `hmm bench plot` measures the series and draws them: the SVG names every
/// series, and the CSV has a row per size of each (4 KiB to 64 MiB for the
/// sweep, 512 KiB to 256 MiB for the self-test benchmark, which has both
/// directions with and without THP). A destination that cannot be written
/// is refused before anything is measured.
#[test]
fn bench_plot_draws_and_writes_the_series() {
    let dir = std::env::temp_dir().join(format!("hmm-plot-test-{}", std::process::id()));
    let svg = dir.join("bench.svg");
    std::fs::create_dir_all(&dir).unwrap();
    let out = hmm(&[
        "bench",
        "plot",
        "--quick",
        "--out",
        svg.to_str().unwrap(),
        "--csv",
        dir.join("csv").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    if !usable() {
        assert!(!out.status.success() && err.contains("cannot run here"), "{err}");
        return;
    }
    assert!(out.status.success(), "{err}");
    let csv = std::fs::read_to_string(dir.join("csv/series.csv")).unwrap();
    let rows = |series: &str| csv.lines().filter(|l| l.contains(&format!("\"{series}\""))).count();
    for s in [
        "memcpy",
        "copy engine, to device",
        "zero-copy engine, to device",
        "fault-back (CPU touch)",
    ] {
        assert_eq!(rows(s), 8, "{s}: {csv}");
    }
    for dir in ["to device", "to system"] {
        for thp in ["THP", "no THP"] {
            assert_eq!(rows(&format!("self-test: {dir}, {thp}")), 10, "{csv}");
        }
    }
    for line in csv.lines().skip(1) {
        let v: f64 = line.split(',').rev().nth(1).unwrap().parse().unwrap();
        assert!(v > 0.0, "{line}");
    }
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg"), "an SVG document");
    for s in ["memcpy", "zero-copy engine, to device", "self-test: to system, THP", "64 MiB"] {
        assert!(picture.contains(s), "{s} missing from the plot");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let out = hmm(&["bench", "plot", "--out", "/nonexistent-dir/b.svg"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot write the plot"));
}

/// `hmm stress` ends with the one summary line and exits zero when nothing
/// diverged; bad arguments are refused.
#[test]
fn stress_ends_with_the_summary_line() {
    let out =
        hmm(&["stress", "--ops", "400", "--seed", "9", "--pages", "64", "--no-device-failures"]);
    if !usable() {
        assert!(!out.status.success());
        return;
    }
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    // Operations run: those planned, less the few skipped (unmaps past the
    // budget), which the run reports on stderr.
    let last = text.trim().lines().last().unwrap_or_default();
    let ran: u64 = last
        .strip_prefix("ops=")
        .and_then(|r| r.strip_suffix(" divergences=0"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not the summary line: {last}"));
    assert!((360..=400).contains(&ran), "{last}");
    let out = hmm(&["stress", "--threads", "0"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Without `CAP_SYS_PTRACE` hmm has no FORK event, so a forked child reads
/// zeros where its parent's pages live on a device. A stress run there
/// judges only what hmm promises: it leaves forks out, checks the pages
/// after a device failure in its own process, says so, and finds nothing
/// wrong (it reported false divergences before).
#[test]
fn stress_without_cap_sys_ptrace_judges_what_hmm_promises_there() {
    let probe = hmm::probe::probe();
    if !probe.root || !std::path::Path::new("/usr/bin/setpriv").exists() || !usable() {
        eprintln!(
            "SKIP: needs root, a usable userfaultfd and /usr/bin/setpriv to drop the capability"
        );
        return;
    }
    let out = common::output_within(
        Command::new("/usr/bin/setpriv").args([
            "--bounding-set=-sys_ptrace",
            "--inh-caps=-sys_ptrace",
            env!("CARGO_BIN_EXE_hmm"),
            "stress",
            "--ops",
            "3000",
            "--seed",
            "3",
        ]),
        RUN_LIMIT,
    );
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if stderr.contains("cannot start hmm")
        || stderr.contains("userfaultfd") && !out.status.success()
    {
        eprintln!("SKIP: hmm cannot start without CAP_SYS_PTRACE here: {stderr}");
        return;
    }
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.trim().ends_with("divergences=0"), "{stdout}");
    assert!(stderr.contains("left out here: fork operations"), "{stderr}");
}

/// `hmm bench --csv` makes one directory level and says so, but not a whole
/// mistyped path; a run refused (or failed) leaves no empty plot file.
#[test]
fn bench_outputs_are_checked_before_the_run_and_leave_nothing_behind() {
    let base = std::env::temp_dir().join(format!("hmm-bench-out-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let plot = base.join("b.svg");
    let deep = base.join("no/such/dir");
    let out = hmm(&[
        "bench",
        "--quick",
        "--csv",
        deep.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot make the CSV directory"), "{err}");
    assert!(!base.join("no").exists(), "no part of the mistyped path is made");
    assert!(!plot.exists(), "no empty plot file is left");
    // The plot's destination alone refused: nothing made either.
    let out = hmm(&[
        "bench",
        "--quick",
        "--csv",
        base.join("csv").to_str().unwrap(),
        "--plot",
        "/nonexistent-dir/b.svg",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("made the CSV directory"));
    std::fs::remove_dir_all(&base).unwrap();
}

/// A long demo shows its progress on stderr (here not a terminal: a line
/// per tenth of the build, and each phase as it starts), so that a run of
/// minutes is not a silent one.
#[test]
fn a_long_demo_shows_its_progress() {
    if !usable() {
        eprintln!("SKIP: the demo needs a usable userfaultfd");
        return;
    }
    let out = hmm(&["demo", "--nodes", "1000000", "--array-mib", "4"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("nodes linked: 500000 of 1000000 (50%)"), "{err}");
    assert!(err.contains("hmm demo: device job"), "{err}");
    assert_columns_line_up(&String::from_utf8_lossy(&out.stdout), "time");
}
