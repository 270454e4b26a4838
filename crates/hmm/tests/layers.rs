//! The core's layering (DESIGN.md, "Layers"): each part of the library may
//! use only the parts below it, so that no two parts need each other and
//! each can be read, used and tested with only what is below it.
//!
//! The check reads the library's source. A part is a top-level module, or a
//! file of `mirror/` (the mirror straddles the layers: its notifiers and
//! request types sit low, its `range_fault` above the state it reads). It
//! fails on
//! - a `crate::` path in a part's code (tests and comments aside) that names
//!   a part above it; and
//! - a call, from a part, of a method of the shared state (`impl Inner`)
//!   that a part above it defines: the state's methods may live with the
//!   part whose work they do, but only the parts at or above it call them.
//!
//! A part added to the library must be placed in `LAYERS` (the test says
//! so), which keeps DESIGN.md's diagram and the code one picture.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The parts, bottom first. A part may use those before it.
const LAYERS: &[&str] = &[
    // Foundations: addresses, page records, the OS layer, tracing.
    "addr",
    "page",
    "sync",
    "interval",
    "os",
    "trace",
    "probe",
    // What a device is: its DMA engine, its memory.
    "dma",
    "devmem",
    // The mirror's halves that need no address space.
    "mirror::request",
    "mirror::notifier",
    // Errors every part above returns, then the state they share.
    "error",
    "state",
    // Mechanisms on the state.
    "coherent",
    "migrate",
    "mirror::range_fault",
    "remap",
    "fork",
    // The fault service, which drives them from userfaultfd's messages, and
    // the faults threads serve themselves (FaultMode::InThread).
    "fault",
    "inthread",
    // What applications and drivers hold.
    "space",
    "observe",
    "driver",
    "policy",
];

/// Parts that only tests build.
const TEST_ONLY: &[&str] = &["model", "testdev"];

/// Directory modules whose files are parts of their own.
const SPLIT: &[&str] = &["mirror"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The part a file belongs to: `mirror/request.rs` is `mirror::request`
/// (a split module), `state/range.rs` is `state`, `os/mm.rs` is `os`.
fn part_of(rel: &Path) -> String {
    let parts: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let top = parts[0].clone();
    if SPLIT.contains(&top.as_str()) && parts.len() > 1 && parts[1] != "mod" {
        format!("{top}::{}", parts[1])
    } else {
        top
    }
}

/// A file's code: comments dropped, and nothing from its test module on.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]"
            && lines.peek().is_some_and(|n| n.trim_start().starts_with("mod tests"))
        {
            break;
        }
        let line = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Identifiers in `s`, in order.
fn idents(s: &str) -> Vec<&str> {
    s.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|w| !w.is_empty()).collect()
}

/// What a split module's `mod.rs` re-exports: name to the file it is from.
fn reexports(module: &str) -> BTreeMap<String, String> {
    let text = code(&src().join(module).join("mod.rs"));
    let mut map = BTreeMap::new();
    for stmt in text.split(';') {
        let s = stmt.trim();
        let Some(rest) = s
            .strip_prefix("pub use ")
            .or_else(|| s.strip_prefix("pub(crate) use "))
            .or_else(|| s.find("pub(crate) use ").map(|i| &s[i + "pub(crate) use ".len()..]))
        else {
            continue;
        };
        let rest = rest.trim_start_matches("self::");
        let Some((file, names)) = rest.split_once("::") else { continue };
        for n in idents(names) {
            map.insert(n.to_string(), file.to_string());
        }
    }
    map
}

/// The leading identifier of `s`.
fn ident(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// The parts a file's `crate::` paths (and, in a split module, `super::`
/// paths) name.
fn uses(
    text: &str,
    own: &str,
    rex: &BTreeMap<String, BTreeMap<String, String>>,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let resolve = |module: &str, name: Option<&str>, out: &mut BTreeSet<String>| {
        let part = match (rex.get(module), name) {
            (Some(_), Some(n)) if src().join(module).join(format!("{n}.rs")).exists() => {
                format!("{module}::{n}")
            }
            (Some(names), Some(n)) if names.contains_key(n) => format!("{module}::{}", names[n]),
            _ => module.to_string(),
        };
        out.insert(part);
    };
    let parent = own.split_once("::").map(|(m, _)| m);
    for (prefix, fixed) in [("crate::", None), ("super::", parent)] {
        if prefix == "super::" && fixed.is_none() {
            continue;
        }
        let mut at = 0;
        while let Some(i) = text[at..].find(prefix) {
            let start = at + i;
            at = start + prefix.len();
            // Not the tail of a longer identifier (`my_crate::`).
            if text[..start].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let rest = &text[at..];
            // The module, and what follows its `::`, if anything.
            let (module, rest) = match fixed {
                Some(m) => (m, Some(rest)),
                None => {
                    let m = ident(rest);
                    (m, rest[m.len()..].strip_prefix("::"))
                }
            };
            let names: Vec<&str> = match rest {
                Some(r) if r.starts_with('{') => idents(&r[1..r.find('}').unwrap_or(r.len())]),
                Some(r) if !ident(r).is_empty() => vec![ident(r)],
                _ => Vec::new(),
            };
            if names.is_empty() {
                resolve(module, None, &mut out);
            }
            for n in names {
                resolve(module, Some(n), &mut out);
            }
        }
    }
    out.remove(own);
    out
}

/// The methods each part defines on the shared state, `impl Inner { .. }`.
fn state_methods(files: &[(String, String)]) -> BTreeMap<String, String> {
    let mut defined = BTreeMap::new();
    for (part, text) in files {
        let mut in_impl = false;
        for line in text.lines() {
            if line.starts_with("impl Inner {") {
                in_impl = true;
            } else if line.starts_with('}') {
                in_impl = false;
            } else if in_impl {
                let l = line.trim_start();
                let l =
                    l.strip_prefix("pub(crate) ").or_else(|| l.strip_prefix("pub ")).unwrap_or(l);
                if line.starts_with("    ")
                    && !line.starts_with("     ")
                    && let Some(rest) = l.strip_prefix("fn ")
                {
                    let name: String =
                        rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    defined.insert(name, part.clone());
                }
            }
        }
    }
    defined
}

#[test]
fn every_part_uses_only_the_parts_below_it() {
    let rank: BTreeMap<&str, usize> = LAYERS.iter().enumerate().map(|(i, p)| (*p, i)).collect();
    let mut paths = Vec::new();
    rust_files(&src(), &mut paths);
    let rex: BTreeMap<String, BTreeMap<String, String>> =
        SPLIT.iter().map(|m| (m.to_string(), reexports(m))).collect();

    let mut files = Vec::new();
    let mut unplaced = BTreeSet::new();
    for p in &paths {
        let rel = p.strip_prefix(src()).expect("under src");
        if rel == Path::new("lib.rs") {
            continue;
        }
        let part = part_of(rel);
        if TEST_ONLY.contains(&part.as_str()) {
            continue;
        }
        if SPLIT.contains(&part.as_str()) {
            // A split module's mod.rs: documentation and re-exports only.
            continue;
        }
        if !rank.contains_key(part.as_str()) {
            unplaced.insert(part.clone());
        }
        files.push((part, code(p), rel.display().to_string()));
    }
    assert!(
        unplaced.is_empty(),
        "parts not placed in LAYERS (tests/layers.rs) nor in DESIGN.md's diagram: {unplaced:?}"
    );

    let mut wrong = Vec::new();
    for (part, text, file) in &files {
        let own = rank[part.as_str()];
        for used in uses(text, part, &rex) {
            match rank.get(used.as_str()) {
                Some(r) if *r < own => {}
                Some(_) => wrong.push(format!("{file} ({part}) uses {used}, which is above it")),
                None => wrong.push(format!("{file} ({part}) uses {used}, which LAYERS lacks")),
            }
        }
    }

    let pairs: Vec<(String, String)> =
        files.iter().map(|(p, t, _)| (p.clone(), t.clone())).collect();
    let methods = state_methods(&pairs);
    // Only the methods of parts above the state: the state's own are
    // everyone's, and their names (`find`, `device`) are too common to tell.
    let above_state: Vec<(&String, &String)> =
        methods.iter().filter(|(_, p)| rank[p.as_str()] > rank["state"]).collect();
    assert!(
        above_state.iter().any(|(m, _)| m.as_str() == "migrate_to_system"),
        "the scan of `impl Inner` blocks found none of the migration helpers: {methods:?}"
    );
    for (part, text, file) in &files {
        let own = rank[part.as_str()];
        for (method, at) in &above_state {
            if rank[at.as_str()] > own && text.contains(&format!(".{method}(")) {
                wrong.push(format!(
                    "{file} ({part}) calls Inner::{method}, which {at}, above it, defines"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "the layering is broken:\n  {}", wrong.join("\n  "));
}

#[test]
fn the_check_sees_an_upward_use() {
    // The scanner itself: a use of a part above, in each of the forms the
    // code writes, is seen; comments and tests are not.
    let rex: BTreeMap<String, BTreeMap<String, String>> =
        SPLIT.iter().map(|m| (m.to_string(), reexports(m))).collect();
    let text = "use crate::fault::{A, B};\nlet x = crate::migrate::Selection::All;\n\
                use crate::mirror::{RangeFault, Notifiers};\n";
    let seen = uses(text, "devmem", &rex);
    let want: BTreeSet<String> = ["fault", "migrate", "mirror::request", "mirror::notifier"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(seen, want);
    let inner = uses(
        "use super::request::RangeFault;\nuse super::Notifiers;\n",
        "mirror::range_fault",
        &rex,
    );
    assert_eq!(
        inner,
        ["mirror::notifier", "mirror::request"].iter().map(|s| s.to_string()).collect()
    );
    let dir = std::env::temp_dir().join(format!("hmm-layers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let f = dir.join("x.rs");
    std::fs::write(&f, "// crate::fault\nuse crate::addr::X;\n#[cfg(test)]\nmod tests {\n use crate::space::Y;\n}\n")
        .expect("write a sample");
    let seen = uses(&code(&f), "page", &rex);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(seen, ["addr".to_string()].into_iter().collect());
}
