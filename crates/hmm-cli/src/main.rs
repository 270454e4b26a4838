//! `hmm`: check the kernel, run the demo, measure.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use hmm::probe::{self, Probe, Verdict};
use hmm_tools::bench::{self, BenchOptions};

mod demo;
mod plot;

#[derive(Parser, Debug)]
#[command(
    name = "hmm",
    version,
    about = "Heterogeneous Memory Management for Linux processes, in user space"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Probe the kernel: which features hmm can use, and what is missing.
    Check {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Measure the baselines, then every hmm figure against them.
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Fewer repetitions (a few seconds).
        #[arg(long, global = true)]
        quick: bool,
        /// Also measure the kernel's zram swap-in as an anchor. Root only: it
        /// adds a zram device of its own, swaps on it for the run and removes
        /// it afterwards (skipped, with the reason, where that cannot be done).
        #[arg(long)]
        zram: bool,
        /// Also measure the series (throughput against size) and write them,
        /// with the figures, as CSV files into this directory.
        #[arg(long, value_name = "DIR")]
        csv: Option<std::path::PathBuf>,
        /// Also measure the series and draw them as an SVG into this file.
        #[arg(long, value_name = "FILE")]
        plot: Option<std::path::PathBuf>,
        #[command(subcommand)]
        only: Option<BenchOnly>,
    },
    /// Run the demonstration on the built-in software device: a data set
    /// built by the CPU, computed on by a device through the shared address
    /// space, read back by the CPU, checked.
    Demo {
        #[command(flatten)]
        args: demo::DemoArgs,
        /// Also explain, step by step, what hmm does underneath.
        #[arg(long)]
        explain: bool,
    },
    /// Model-based random testing: random operations applied to hmm and to a
    /// byte-array model, compared after every step. Ends with one line
    /// `ops=M divergences=D`; exits non-zero if D > 0.
    Stress(StressArgs),
    /// Record the migrations, faults and invalidations of a run (the demo or
    /// the benchmark) as a timeline: a Chrome-trace JSON file that Perfetto
    /// (ui.perfetto.dev) and chrome://tracing open.
    Trace {
        /// Where to write the trace (before or after the run's name:
        /// `hmm trace --out t.json demo` or `hmm trace demo --out t.json`).
        #[arg(long, short, default_value = "hmm-trace.json", global = true)]
        out: std::path::PathBuf,
        #[command(subcommand)]
        run: Traced,
    },
}

/// How `hmm stress` runs.
#[derive(clap::Args, Debug)]
struct StressArgs {
    /// Seed of every random choice (a failing seed replays the same operations).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Operations in all.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    ops: u64,
    /// Worker threads, each on its own range, sharing the devices.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: u64,
    /// Pages of each worker's range.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=262_144))]
    pages: u64,
    /// Leave device failures out (with one thread they are planned now and
    /// then: the device's pages are lost, checked, and a new device replaces it).
    #[arg(long)]
    no_device_failures: bool,
}

/// A part of the benchmark on its own.
#[derive(Subcommand, Debug)]
enum BenchOnly {
    /// Run access patterns (stream, random, Zipf, CPU/device ping-pong) on a
    /// software device with the placement policy off and on, at device
    /// memory oversubscription factors, against the same pattern fully
    /// resident; then say which of the placement goals hold.
    Workloads {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Measure only the series (throughput against migration size: copy,
    /// zero-copy, fault-back, memcpy, and the kernel self-test's migration
    /// benchmark) and draw them as an SVG.
    Plot {
        /// Where to write the SVG.
        #[arg(long, short, default_value = "hmm-bench.svg")]
        out: std::path::PathBuf,
        /// Also write the series as CSV into this directory.
        #[arg(long, value_name = "DIR")]
        csv: Option<std::path::PathBuf>,
    },
}

/// What `hmm trace` runs.
#[derive(Subcommand, Debug)]
enum Traced {
    /// The demonstration (same options as `hmm demo`).
    Demo {
        #[command(flatten)]
        args: demo::DemoArgs,
    },
    /// The benchmark (`--quick` for a short run; its figures are printed
    /// as `hmm bench` prints them).
    Bench {
        /// Fewer repetitions (a few seconds).
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { json } => check(json),
        Command::Bench { json, quick, zram, csv, plot, only } => match only {
            None => bench(json, quick, zram, &Outputs { csv, plot }),
            Some(BenchOnly::Plot { out, csv }) => {
                bench_series(quick, &Outputs { csv, plot: Some(out) })
            }
            Some(BenchOnly::Workloads { json }) => bench_workloads(json, quick),
        },
        Command::Demo { args, explain } => demo(&args, explain),
        Command::Trace { out, run } => trace(&out, run),
        Command::Stress(args) => stress(&args),
    }
}

/// Writes to stdout; a closed pipe (`hmm check | head`) ends quietly.
fn out(text: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes());
    let _ = o.flush();
}

fn verdict_exit(p: &Probe) -> ExitCode {
    if p.usable().is_ok() { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

fn check(json: bool) -> ExitCode {
    let p = probe::probe();
    let zram = hmm_tools::bench::zram::available();
    // The Redis figures run on a redis-server the bench starts itself.
    let redis = std::process::Command::new("redis-server")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if json {
        let mut v = serde_json::to_value(p).expect("probe serializes");
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "bench_anchors".into(),
                serde_json::json!({
                    "zram": { "available": zram.is_ok(), "why_not": zram.as_ref().err().map(ToString::to_string) },
                    "redis": { "available": redis, "why_not": (!redis).then_some("redis-server is not on PATH (apt-get install redis-server)") },
                }),
            );
        }
        out(&format!("{}\n", serde_json::to_string_pretty(&v).expect("JSON")));
    } else {
        out(&render_probe(p));
        out(&match &zram {
            Ok(()) => {
                "benchmark anchors: zram swap-in can be measured (hmm bench --zram)\n".to_string()
            }
            Err(why) => format!("benchmark anchors: zram swap-in cannot be measured here: {why}\n"),
        });
        out(if redis {
            "benchmark anchors: redis-server found: the Redis tier's figures are measured on one the bench starts\n"
        } else {
            "benchmark anchors: no redis-server on PATH: the Redis tier's figures are skipped (apt-get install redis-server)\n"
        });
    }
    verdict_exit(p)
}

fn render_probe(p: &Probe) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "kernel {}  page size {}  {}  userfaultfd via {}\n",
        p.kernel_release,
        p.page_size,
        if p.root { "root" } else { "not root" },
        p.uffd.origin
    ));
    if let Some(v) = p.unprivileged_userfaultfd {
        s.push_str(&format!("vm.unprivileged_userfaultfd = {v}"));
    }
    if let Some(m) = p.seccomp_mode {
        s.push_str(&format!("  seccomp mode {m}"));
    }
    s.push('\n');
    if !p.uffd.api_feature_names.is_empty() {
        s.push_str(&format!("UFFDIO_API features: {}\n", p.uffd.api_feature_names.join(" ")));
    }
    for a in &p.uffd.attempts {
        s.push_str(&format!("  tried {a}\n"));
    }
    s.push('\n');
    let w = p.features.iter().map(|f| f.name.len()).max().unwrap_or(8).max(7);
    s.push_str(&format!("{:<w$}  {:<7}  used for\n", "feature", "present"));
    s.push_str(&format!("{:-<w$}  {:-<7}  {:-<8}\n", "", "", ""));
    for f in &p.features {
        let present = match (f.present, f.required) {
            (true, _) => "yes",
            (false, true) => "NO (!)",
            (false, false) => "no",
        };
        s.push_str(&format!("{:<w$}  {:<7}  {}\n", f.name, present, f.used_for));
        if !f.present {
            s.push_str(&format!("{:<w$}  {:<7}  without it: {}\n", "", "", f.if_missing));
        }
        if let Some(d) = &f.detail {
            s.push_str(&format!("{:<w$}  {:<7}  ({d})\n", "", ""));
        }
    }
    s.push('\n');
    match &p.verdict {
        Verdict::Ready => s.push_str("verdict: ready: every feature hmm uses is available\n"),
        Verdict::Degraded { missing } => s.push_str(&format!(
            "verdict: ready, with these optional features missing: {}\n",
            missing.join(", ")
        )),
        Verdict::Unusable { reason, fix } => {
            s.push_str(&format!("verdict: hmm cannot run here\n  why: {reason}\n  fix: {fix}\n"))
        }
    }
    s
}

/// Where `hmm bench` writes its series, if anywhere.
#[derive(Debug, Default)]
struct Outputs {
    csv: Option<std::path::PathBuf>,
    plot: Option<std::path::PathBuf>,
}

impl Outputs {
    fn wanted(&self) -> bool {
        self.csv.is_some() || self.plot.is_some()
    }

    /// Refuses unusable destinations before anything is measured.
    fn check(&self) -> Result<(), String> {
        if let Some(d) = &self.csv
            && !d.is_dir()
        {
            // One level is made, and said: a mistyped path is not made whole.
            std::fs::create_dir(d)
                .map_err(|e| format!("cannot make the CSV directory {}: {e}", d.display()))?;
            eprintln!("hmm bench: made the CSV directory {}", d.display());
        }
        if let Some(f) = &self.plot {
            // Opened for writing without emptying it: a file the run will not
            // replace (the run fails first) keeps what it held, and one made
            // only to ask is removed at once, so a failed run leaves none.
            let existed = f.exists();
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(f)
                .map_err(|e| format!("cannot write the plot {}: {e}", f.display()))?;
            if !existed {
                let _ = std::fs::remove_file(f);
            }
        }
        Ok(())
    }

    fn write(
        &self,
        figures: Option<&bench::BenchReport>,
        series: &[bench::series::Series],
    ) -> Result<(), String> {
        if let Some(d) = &self.csv {
            let put = |name: &str, text: String| {
                let p = d.join(name);
                std::fs::write(&p, text).map_err(|e| format!("cannot write {}: {e}", p.display()))
            };
            put("series.csv", bench::series::to_csv(series))?;
            if let Some(b) = figures {
                let mut s = String::from("key,value,unit\n");
                for r in b.rows() {
                    let v = r.value.map_or_else(String::new, |v| format!("{v:.4}"));
                    s.push_str(&format!("{},{v},{}\n", r.key, r.unit));
                }
                put("figures.csv", s)?;
            }
            eprintln!("hmm bench: CSV written to {}", d.display());
        }
        if let Some(f) = &self.plot {
            if series.is_empty() {
                eprintln!("hmm bench: no plot: the series need hmm, which cannot run here");
            } else {
                plot::draw(f, series, "hmm on the software device")?;
                eprintln!("hmm bench: plot written to {}", f.display());
            }
        }
        Ok(())
    }
}

/// Progress of a long run: a bar on a terminal, a line per step otherwise,
/// nothing for `--json`.
struct Progress {
    bar: ProgressBar,
    lines: bool,
}

impl Progress {
    /// Shows that `step` has started.
    fn step(&self, step: bench::Step) {
        self.bar.set_position(step.index as u64);
        self.bar.set_message(step.name);
        if self.lines {
            eprintln!("  [{}/{}] {}", step.index + 1, step.total, step.name);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

fn progress(json: bool, total: usize, what: &str) -> Progress {
    let show = !json && std::io::stderr().is_terminal();
    let bar = ProgressBar::with_draw_target(
        Some(total as u64),
        if show { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
    );
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .expect("static template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    if !json && !show {
        eprintln!("{what}...");
    }
    Progress { bar, lines: !json && !show }
}

fn measure_series(json: bool, quick: bool) -> Result<Vec<bench::series::Series>, String> {
    let p = progress(json, bench::series::SERIES_STEPS, "measuring the series");
    let res =
        bench::series::run_series(BenchOptions { quick, zram: false }, &mut |step| p.step(step));
    drop(p);
    res.map_err(|e| e.to_string())
}

fn bench_series(quick: bool, outputs: &Outputs) -> ExitCode {
    let done = outputs.check().and_then(|()| {
        if let Err((reason, fix)) = probe::probe().usable() {
            return Err(format!("the series need hmm, which cannot run here: {reason} ({fix})"));
        }
        let series = measure_series(false, quick)?;
        outputs.write(None, &series)
    });
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hmm bench: {e}");
            ExitCode::from(1)
        }
    }
}

fn bench(json: bool, quick: bool, zram: bool, outputs: &Outputs) -> ExitCode {
    if let Err(e) = outputs.check() {
        eprintln!("hmm bench: {e}");
        return ExitCode::from(1);
    }
    let what =
        format!("measuring baselines and migration figures{}", if quick { " (quick)" } else { "" });
    let p = progress(json, bench::ALL_STEPS, &what);
    let res = bench::run_all(BenchOptions { quick, zram }, &mut |step| p.step(step));
    drop(p);
    let b = match res {
        Ok(b) => b,
        Err(e) => {
            eprintln!("hmm bench: {e}");
            return ExitCode::from(1);
        }
    };
    // The figures first: a failure of the series loses none of them.
    if json {
        out(&format!("{}\n", serde_json::to_string(&b).expect("bench report serializes")));
    } else {
        // Columns as wide as their widest cell, so that none overflows.
        let rows: Vec<_> = b
            .rows()
            .into_iter()
            .map(|r| (r.value.map_or_else(|| "n/a".to_string(), |v| format!("{v:.3}")), r))
            .collect();
        let kw = rows.iter().map(|(_, r)| r.key.len()).max().unwrap_or(0).max(3);
        let vw = rows.iter().map(|(v, _)| v.len()).max().unwrap_or(0).max(5);
        let uw = rows.iter().map(|(_, r)| r.unit.len()).max().unwrap_or(0).max(4);
        let mut s = format!("{:<kw$} {:>vw$}  {:<uw$} what\n", "key", "value", "unit");
        for (v, r) in &rows {
            s.push_str(&format!("{:<kw$} {:>vw$}  {:<uw$} {}\n", r.key, v, r.unit, r.what));
        }
        out(&s);
    }
    if outputs.wanted() {
        let written = if probe::probe().usable().is_ok() {
            measure_series(json, quick).and_then(|s| outputs.write(Some(&b), &s))
        } else {
            outputs.write(Some(&b), &[])
        };
        if let Err(e) = written {
            eprintln!("hmm bench: the series: {e}");
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}

fn bench_workloads(json: bool, quick: bool) -> ExitCode {
    if let Err((reason, fix)) = probe::probe().usable() {
        eprintln!("hmm bench workloads: hmm cannot run here: {reason}\nfix: {fix}");
        return ExitCode::from(1);
    }
    let p = progress(json, bench::workloads::WORKLOAD_STEPS, "running the workloads");
    let res = bench::workloads::run_workloads(BenchOptions { quick, zram: false }, &mut |step| {
        p.step(step)
    });
    drop(p);
    let w = match res {
        Ok(w) => w,
        Err(e) => {
            eprintln!("hmm bench workloads: {e}");
            return ExitCode::from(1);
        }
    };
    if json {
        out(&format!("{}\n", serde_json::to_string(&w).expect("workload report serializes")));
        return ExitCode::SUCCESS;
    }
    let mut s = format!(
        "working set {} pages ({} MiB); factor = working set / device memory\n\n",
        w.working_set_pages,
        (w.working_set_pages * hmm::PAGE_SIZE) >> 20
    );
    s.push_str(&format!(
        "{:<10} {:>6} {:<20} {:>9} {:>10} {:>11} {:>11} {:>8} {:>10} {:>9} {:>5}\n",
        "pattern",
        "factor",
        "policy",
        "accesses",
        "ms",
        "x resident",
        "migrations",
        "evicted",
        "prefetched",
        "throttles",
        "pins"
    ));
    for r in &w.rows {
        let factor = if r.factor > 0.0 { format!("{:.2}", r.factor) } else { "-".into() };
        s.push_str(&format!(
            "{:<10} {:>6} {:<20} {:>9} {:>10.1} {:>11.2} {:>11} {:>8} {:>10} {:>9} {:>5}\n",
            r.pattern,
            factor,
            r.policy,
            r.accesses,
            r.ms,
            r.ms / r.resident_ms,
            r.migrations,
            r.evicted,
            r.decisions.pages_prefetched,
            r.decisions.throttles,
            r.decisions.pins
        ));
    }
    s.push_str("\ngoals:\n");
    for g in &w.goals {
        let verdict = match g.met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        s.push_str(&format!("  [{verdict}] {}: {}\n", g.goal, g.detail));
    }
    out(&s);
    ExitCode::SUCCESS
}

fn stress(a: &StressArgs) -> ExitCode {
    if let Err((reason, fix)) = probe::probe().usable() {
        eprintln!("hmm stress: hmm cannot run here: {reason}\nfix: {fix}");
        return ExitCode::from(1);
    }
    let cfg = hmm_tools::stress::StressConfig {
        seed: a.seed,
        ops: a.ops,
        threads: a.threads as usize,
        pages: a.pages as usize,
        device_failures: !a.no_device_failures,
    };
    let p = progress(false, a.ops as usize, "running the operations");
    p.bar.set_message(format!("seed {}", a.seed));
    let report = hmm_tools::stress::run(cfg, &|n| p.bar.set_position(n));
    drop(p);
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hmm stress: {e}");
            return ExitCode::from(1);
        }
    };
    let kinds: Vec<String> = report.by_kind.iter().map(|(k, v)| format!("{k} {v}")).collect();
    eprintln!("seed {}: {}", a.seed, kinds.join(", "));
    for d in &report.divergences {
        eprintln!("divergence: {d}");
    }
    if let Some(ops) = &report.shrunk {
        eprintln!(
            "shrunk to {} operations (replay with --seed {} --threads 1):",
            ops.len(),
            a.seed
        );
        for op in ops {
            eprintln!("  {op:?}");
        }
    }
    if report.skipped > 0 {
        eprintln!(
            "{} operations skipped (unmaps past a quarter of a range, or what this kernel lacks)",
            report.skipped
        );
    }
    for what in &report.left_out {
        eprintln!("left out here: {what}");
    }
    out(&format!("ops={} divergences={}\n", report.ops, report.divergences.len()));
    if report.divergences.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

fn trace(path: &std::path::Path, run: Traced) -> ExitCode {
    // Refuse an unwritable destination before the run, not after it.
    let file = match std::fs::File::create(path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("hmm trace: cannot write {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    hmm::trace::start();
    let code = match run {
        Traced::Demo { args } => demo(&args, false),
        Traced::Bench { quick } => bench(false, quick, false, &Outputs::default()),
    };
    let t = hmm::trace::stop();
    if code != ExitCode::SUCCESS {
        eprintln!("hmm trace: the run failed; the trace holds what happened before it stopped");
    }
    let mut w = std::io::BufWriter::new(file);
    if let Err(e) = t.write_chrome_json(&mut w).and_then(|()| w.flush()) {
        eprintln!("hmm trace: cannot write {}: {e}", path.display());
        return ExitCode::from(1);
    }
    let counts: Vec<String> = t.counts().iter().map(|(k, v)| format!("{k} {v}")).collect();
    eprintln!(
        "hmm trace: {} events ({}) written to {}{}; open it in https://ui.perfetto.dev or chrome://tracing",
        t.events().len(),
        counts.join(", "),
        path.display(),
        if t.dropped() > 0 { format!(", {} more dropped", t.dropped()) } else { String::new() },
    );
    code
}

const WALKTHROUGH: &str = "\
What hmm does, step by step
---------------------------
1. Managed memory. A range of the process (a new mapping, or one the program
   already has) is registered with a userfaultfd. hmm keeps one small record per
   4 KiB page: where its data lives (system memory, a device page, poisoned, or
   never populated).
2. Migration to a device. setup: the pages are made unreachable (dropped from the
   CPU page table, so no CPU write can be lost during the copy) and every device
   mirror of them is invalidated. copy: the device's DMA engine copies them into
   device memory (a page never touched just gets a zeroed device page). finalize:
   each page's record points at its device page; a page that could not move says
   why, and keeps its data.
3. CPU touch of a migrated page. The CPU page is missing, so the touch faults to
   userfaultfd; hmm's fault service asks the owning device to migrate the page
   (and a chunk around it) back, installs it with UFFDIO_COPY or UFFDIO_MOVE, and
   wakes the thread. The touch completes with the right bytes.
4. Mirroring. A device keeps its own page table, filled through range_fault
   (PAGEMAP_SCAN snapshots, MADV_POPULATE_* to fault pages in) under a sequence
   protocol; munmap, mremap, MADV_DONTNEED and fork arrive as userfaultfd events
   and invalidate the device's entries before they take effect.
5. Failure. If a device dies, its pages are poisoned (UFFDIO_POISON): a CPU touch
   of exactly those pages gets SIGBUS; every other page is untouched.
";

fn demo(args: &demo::DemoArgs, explain: bool) -> ExitCode {
    let p = probe::probe();
    out(&format!("kernel {}: ", p.kernel_release));
    if let Err((reason, fix)) = p.usable() {
        out("hmm cannot run here
");
        eprintln!(
            "why: {reason}
fix: {fix}
(`hmm check` tells everything this kernel offers)"
        );
        return ExitCode::from(1);
    }
    out("hmm can run here (`hmm check` says what it offers)\n");
    if explain {
        out("\n");
        out(WALKTHROUGH);
    }
    out("\n");
    match demo::run(args, &mut |s| out(s)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hmm demo: {e}");
            ExitCode::from(1)
        }
    }
}
