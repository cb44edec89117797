//! `cargo xtask layers`: checks the architecture rules that keep the code base easy to change,
//! and is one of the lints of `cargo xtask test`.
//!
//! a) **Layer order of the agent.** README.md's `## Architecture` table lists the agent's
//!    layers from top to bottom and the modules of each. A file of `agent/src` belongs to the
//!    row listing the longest prefix of its module path, and may use its own layer and the ones
//!    below, never one above: lower layers can then be understood, tested and changed without
//!    the upper ones. Every file must be in a row, and every listed module must exist.
//!    `main.rs` stands above every row; `lib.rs` is exempt.
//! b) **No two files import each other**, in every crate: such a pair is one piece of code in
//!    two files, and neither can be read or moved alone. A file imports another when one of
//!    its paths (`use`, `pub use`, `crate::`/`self::`/`super::` paths in code, relative paths
//!    through a child module or a `use`d name) resolves into it; `mod x;` alone does not count.
//! c) **No `.rs` file over 600 lines**: a file that long holds more than one idea.
//!
//! Files are those git knows or would add (`git ls-files --cached --others --exclude-standard`),
//! so `target/` and other ignored files are never read.
//!
//! The sources are read with a small lexer ([`parse`]), not compiled: comments and string
//! literals are skipped, macros are not expanded.

mod graph;
mod parse;
mod readme;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use graph::{Graph, ModPath};

use crate::util::{output, repo_root};

/// Longest a source file may be.
pub const MAX_LINES: usize = 600;
/// The crate whose layers README.md lists.
const AGENT_SRC: &str = "agent/src";

/// What the check found.
#[derive(Debug, Default)]
pub struct Report {
    pub files: usize,
    pub imports: usize,
    pub violations: Vec<String>,
}

/// `cargo xtask layers`: prints the violations and a summary line; fails if there are any.
pub fn layers() -> Result<()> {
    let report = check_repo(&repo_root())?;
    for v in &report.violations {
        println!("{v}");
    }
    let counts = format!("{} files, {} imports checked", report.files, report.imports);
    if report.violations.is_empty() {
        println!("layers: ok ({counts})");
        Ok(())
    } else {
        println!(
            "layers: FAILED ({} violations; {counts})",
            report.violations.len()
        );
        bail!(
            "{} architecture violations (listed above)",
            report.violations.len()
        )
    }
}

/// Reads the repository's `.rs` files (tracked or new, not ignored), its crates and README.md,
/// and checks them.
pub fn check_repo(root: &Path) -> Result<Report> {
    let tracked = output(
        Command::new("git")
            .arg("-C")
            .arg(root)
            // Tracked files and new ones not yet added (what cargo would compile), never
            // ignored ones (target/).
            .args([
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ])
            .args(["--", "*.rs", "*Cargo.toml"]),
    )
    .context("list the tracked sources (git ls-files)")?;
    let mut files = BTreeMap::new();
    let mut crate_dirs = Vec::new();
    for f in tracked.split('\0').filter(|f| !f.is_empty()) {
        if f.starts_with("target/") || f.contains("/target/") {
            continue;
        }
        if f == "Cargo.toml" || f.ends_with("/Cargo.toml") {
            crate_dirs.push(
                f.trim_end_matches("Cargo.toml")
                    .trim_end_matches('/')
                    .to_owned(),
            );
        } else if let Ok(src) = std::fs::read_to_string(root.join(f)) {
            // A file deleted but not yet `git rm`ed is not there to check.
            files.insert(f.to_owned(), src);
        }
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap_or_default();
    Ok(check(&crate_dirs, &files, &readme))
}

/// All three rules over `files` (repo-relative path -> source).
pub fn check(crate_dirs: &[String], files: &BTreeMap<String, String>, readme: &str) -> Report {
    let g = Graph::build(crate_dirs, files);
    let mut violations = Vec::new();
    violations.extend(layer_order(&g, readme));
    violations.extend(mutual_imports(&g));
    for (f, src) in files {
        let n = src.lines().count();
        if n > MAX_LINES {
            violations.push(format!(
                "{f} has {n} lines (more than {MAX_LINES}): split it into modules of one idea each"
            ));
        }
    }
    let imports: BTreeSet<_> = g.edges.iter().map(|e| (&e.from, &e.to)).collect();
    Report {
        files: files.len(),
        imports: imports.len(),
        violations,
    }
}

fn show(m: &[String]) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        format!("crate::{}", m.join("::"))
    }
}

/// Rule (a) over the agent library's crate.
fn layer_order(g: &Graph, readme: &str) -> Vec<String> {
    let lib = format!("{AGENT_SRC}/lib.rs");
    let Some(k) = g.crates.iter().position(|c| c.root == lib) else {
        return Vec::new();
    };
    let table = match readme::layers(readme) {
        Ok(t) => t,
        Err(errors) => return errors,
    };
    let mut out = Vec::new();
    let mut listed: BTreeMap<&ModPath, &str> = BTreeMap::new();
    for l in &table {
        for m in &l.modules {
            if let Some(other) = listed.insert(m, &l.name) {
                out.push(format!(
                    "README.md `{}` lists `{}` in both layer '{other}' and layer '{}': keep \
                     it in one",
                    readme::HEADING,
                    m.join("::"),
                    l.name
                ));
            }
            if !g.crates[k].modules.keys().any(|f| f.starts_with(m)) {
                out.push(format!(
                    "README.md `{}` lists `{}` (layer '{}'), but {AGENT_SRC} has no such \
                     module: fix the name or remove it",
                    readme::HEADING,
                    m.join("::"),
                    l.name
                ));
            }
        }
    }
    let name = |i: usize| &table[i].name;
    for ((kk, file), module) in &g.placed {
        if *kk != k || module.is_empty() {
            continue;
        }
        if readme::layer_of(&table, module).is_none() {
            out.push(format!(
                "{file} (module {}) is in no layer: list `{}` (or a module above it) in a row \
                 of README.md's `{}` table",
                show(module),
                module.join("::"),
                readme::HEADING
            ));
        }
    }
    for e in g.edges.iter().filter(|e| e.krate == k) {
        let from = &g.placed[&(k, e.from.clone())];
        let (Some(a), Some(b)) = (
            readme::layer_of(&table, from),
            readme::layer_of(&table, &e.to_module),
        ) else {
            continue;
        };
        if b < a {
            out.push(format!(
                "{}:{} imports {} (layer '{}') from layer '{}' below it: move what it needs \
                 down to layer '{}' or lower, or have '{}' pass it in",
                e.from,
                e.line,
                show(&e.to_module),
                name(b),
                name(a),
                name(a),
                name(b)
            ));
        }
    }
    out
}

/// Rule (b): pairs of files that import each other, in any crate.
fn mutual_imports(g: &Graph) -> Vec<String> {
    let mut first: BTreeMap<(&str, &str), (u32, &ModPath)> = BTreeMap::new();
    for e in &g.edges {
        first
            .entry((&e.from, &e.to))
            .or_insert((e.line, &e.to_module));
    }
    let mut out = Vec::new();
    for (&(a, b), &(line_ab, mod_b)) in &first {
        let Some(&(line_ba, mod_a)) = first.get(&(b, a)) else {
            continue;
        };
        if a < b {
            out.push(format!(
                "{a}:{line_ab} (uses {}) and {b}:{line_ba} (uses {}) import each other: move \
                 what both need into a module both can use, or make one stop using the other",
                show(mod_b),
                show(mod_a)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const README: &str = "## Architecture\n| layer | modules | what |\n|---|---|---|\n\
                          | app | `app` | top |\n| proxy | `proxy` | relays |\n\
                          | base | `sys`, `proxy::wire` | leaves |\n";

    fn run(files: &[(&str, &str)], readme: &str) -> Report {
        let files = files
            .iter()
            .map(|(p, s)| (p.to_string(), s.to_string()))
            .collect();
        check(&["agent".into()], &files, readme)
    }

    const TREE: &[(&str, &str)] = &[
        (
            "agent/src/lib.rs",
            "pub mod app; pub mod proxy; pub mod sys;",
        ),
        (
            "agent/src/main.rs",
            "use sockmesh::app; fn main() { app::run() }",
        ),
        ("agent/src/app.rs", "use crate::proxy::Relay;"),
        (
            "agent/src/proxy/mod.rs",
            "pub mod wire; pub use wire::Frame;",
        ),
        ("agent/src/proxy/wire.rs", "use crate::sys::caps;"),
        ("agent/src/sys.rs", "pub fn x() {}"),
    ];

    #[test]
    fn a_clean_tree_passes() {
        let r = run(TREE, README);
        assert_eq!(r.violations, Vec::<String>::new());
        assert_eq!((r.files, r.imports), (6, 3));
    }

    #[test]
    fn upward_imports_unlisted_and_unknown_modules_are_reported() {
        let mut tree = TREE.to_vec();
        tree[5] = ("agent/src/sys.rs", "fn f() {\n crate::app::h(); }");
        tree.push(("agent/src/extra.rs", ""));
        let readme = format!("{README}| gone | `nothere` | x |\n");
        let r = run(&tree, &readme);
        assert_eq!(
            r.violations,
            [
                "README.md `## Architecture` lists `nothere` (layer 'gone'), but agent/src has \
                 no such module: fix the name or remove it",
                "agent/src/extra.rs (module crate::extra) is in no layer: list `extra` (or a \
                 module above it) in a row of README.md's `## Architecture` table",
                "agent/src/sys.rs:2 imports crate::app (layer 'app') from layer 'base' below \
                 it: move what it needs down to layer 'base' or lower, or have 'app' pass it in",
            ]
        );
    }

    #[test]
    fn mutual_imports_and_long_files_are_reported() {
        let long = "// x\n".repeat(MAX_LINES + 1);
        let mut tree = TREE.to_vec();
        tree[4] = ("agent/src/proxy/wire.rs", "fn f() { super::helper() }");
        tree.push(("agent/src/long.rs", &long));
        let r = run(&tree, "no table here");
        assert_eq!(
            r.violations,
            [
                "README.md has no `## Architecture` section: add one with a markdown table \
                 whose rows are the agent's layers from top to bottom: `| layer | modules | \
                 what lives there |`, e.g. `| app | \\`app\\` | wiring |`",
                "agent/src/proxy/mod.rs:1 (uses crate::proxy::wire) and \
                 agent/src/proxy/wire.rs:1 (uses crate::proxy) import each other: move what \
                 both need into a module both can use, or make one stop using the other",
                "agent/src/long.rs has 601 lines (more than 600): split it into modules of \
                 one idea each",
            ]
        );
    }
}
