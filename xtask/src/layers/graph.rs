//! Which file is which module of which crate, and which files each file imports.
//!
//! Crates are found from their roots (`src/lib.rs`, `src/main.rs`, `src/bin/*.rs`,
//! `tests/*.rs`, `build.rs`, ...) by following `mod` declarations, `#[path]` included, the
//! way rustc does; a file under a crate's `src/` that no declaration reaches is still given
//! the module its path names. A file shared by several crates (`tests/tests/common.rs`) is
//! resolved in each of them.

use std::collections::{BTreeMap, BTreeSet};

use super::parse::{parse, Parsed, PathRef};

/// A module path below `crate`: `["proxy", "relay"]`; empty for the crate root.
pub type ModPath = Vec<String>;

/// One crate: its root file and which file holds each of its file modules.
#[derive(Debug)]
pub struct Crate {
    pub root: String,
    pub modules: BTreeMap<ModPath, String>,
}

/// File `from` uses a path that resolves into file `to` (first such use at `line`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    pub from: String,
    pub to: String,
    pub line: u32,
    /// `to`'s module path in the crate the use was resolved in.
    pub to_module: ModPath,
    pub krate: usize,
}

#[derive(Debug)]
pub struct Graph {
    pub crates: Vec<Crate>,
    /// (crate, file) -> the file's module path in that crate.
    pub placed: BTreeMap<(usize, String), ModPath>,
    pub edges: Vec<Edge>,
}

/// Whether `file` (relative to the repo, `/`-separated) is a crate root of the crate in
/// `dir` (`""` for the repo's top directory).
fn is_root(dir: &str, file: &str) -> bool {
    let Some(rest) = strip_dir(dir, file) else {
        return false;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["build.rs"] | ["src", "lib.rs" | "main.rs"] => true,
        ["src", "bin", f] | ["tests" | "benches" | "examples", f] => f.ends_with(".rs"),
        ["src", "bin", _, "main.rs"] => true,
        _ => false,
    }
}

fn strip_dir<'a>(dir: &str, file: &'a str) -> Option<&'a str> {
    if dir.is_empty() {
        Some(file)
    } else {
        file.strip_prefix(dir)?.strip_prefix('/')
    }
}

fn parent(file: &str) -> &str {
    file.rsplit_once('/').map_or("", |(d, _)| d)
}

fn join(dir: &str, rel: &str) -> String {
    let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
    for p in rel.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

/// The module path of a file under `src` by its name alone: `a/b.rs` and `a/b/mod.rs` are
/// `a::b`.
pub fn module_of_path(src_dir: &str, file: &str) -> Option<ModPath> {
    let rest = strip_dir(src_dir, file)?.strip_suffix(".rs")?;
    let mut segs: ModPath = rest.split('/').map(str::to_owned).collect();
    if segs.last().is_some_and(|s| s == "mod") {
        segs.pop();
    }
    if segs.len() == 1 && (segs[0] == "lib" || segs[0] == "main") {
        segs.clear();
    }
    Some(segs)
}

impl Graph {
    /// Builds the module tree of every crate in `crate_dirs` over `files` (path, source) and
    /// resolves every path that points into a crate.
    pub fn build(crate_dirs: &[String], files: &BTreeMap<String, String>) -> Graph {
        let parsed: BTreeMap<&str, Parsed> = files
            .iter()
            .map(|(f, src)| (f.as_str(), parse(src)))
            .collect();
        let mut g = Graph {
            crates: Vec::new(),
            placed: BTreeMap::new(),
            edges: Vec::new(),
        };
        let mut reached = BTreeSet::new();
        for dir in crate_dirs {
            for root in files.keys().filter(|f| is_root(dir, f)) {
                let k = g.crates.len();
                g.crates.push(Crate {
                    root: root.clone(),
                    modules: BTreeMap::from([(Vec::new(), root.clone())]),
                });
                g.placed.insert((k, root.clone()), Vec::new());
                let mut queue = vec![(root.clone(), Vec::new(), true)];
                while let Some((file, module, mod_rs)) = queue.pop() {
                    reached.insert(file.clone());
                    let own_dir = if mod_rs || file.ends_with("/mod.rs") {
                        parent(&file).to_owned()
                    } else {
                        file.trim_end_matches(".rs").to_owned()
                    };
                    for m in &parsed[file.as_str()].mods {
                        let base = join(&own_dir, &m.inline.join("/"));
                        let (target, by_attr) = match &m.path_attr {
                            Some(p) if m.inline.is_empty() => (join(parent(&file), p), true),
                            Some(p) => (join(&base, p), true),
                            None => {
                                let flat = join(&base, &format!("{}.rs", m.name));
                                let nested = join(&base, &format!("{}/mod.rs", m.name));
                                let found =
                                    [flat, nested].into_iter().find(|f| files.contains_key(f));
                                let Some(f) = found else { continue };
                                (f, false)
                            }
                        };
                        if !files.contains_key(&target) {
                            continue;
                        }
                        let mut path = module.clone();
                        path.extend(m.inline.iter().cloned());
                        path.push(m.name.clone());
                        if g.placed.contains_key(&(k, target.clone())) {
                            continue;
                        }
                        g.crates[k].modules.insert(path.clone(), target.clone());
                        g.placed.insert((k, target.clone()), path.clone());
                        queue.push((target, path, by_attr));
                    }
                }
            }
        }
        // Files no `mod` reaches: by their path, in the crate of their `src/` (lib first).
        for dir in crate_dirs {
            let src = join(dir, "src");
            let home = ["lib.rs", "main.rs"]
                .iter()
                .find_map(|r| g.crates.iter().position(|c| c.root == join(&src, r)));
            let Some(k) = home else { continue };
            for f in files.keys() {
                let in_bin = f.starts_with(&format!("{src}/bin/"));
                let Some(path) = module_of_path(&src, f).filter(|_| !in_bin) else {
                    continue;
                };
                if !reached.contains(f) {
                    g.crates[k].modules.entry(path.clone()).or_insert(f.clone());
                    g.placed.insert((k, f.clone()), path);
                }
            }
        }
        let placed: Vec<_> = g
            .placed
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut seen = BTreeSet::new();
        for ((k, file), module) in placed {
            for e in g.file_edges(k, &file, &module, &parsed[file.as_str()]) {
                if seen.insert((e.from.clone(), e.to.clone(), k)) {
                    g.edges.push(e);
                }
            }
        }
        g
    }

    /// The imports of `file` (module `module` of crate `k`).
    fn file_edges(&self, k: usize, file: &str, module: &[String], p: &Parsed) -> Vec<Edge> {
        let krate = &self.crates[k];
        // Names brought in by `use`: a later path `name::x` continues from there.
        let mut aliases: BTreeMap<&str, Option<ModPath>> = BTreeMap::new();
        for r in p.refs.iter().filter(|r| r.is_use) {
            if let Some(a) = &r.alias {
                aliases.insert(a, absolute(krate, module, r, &BTreeMap::new()));
            }
        }
        let mut out = Vec::new();
        for r in &p.refs {
            let Some(abs) = absolute(krate, module, r, &aliases) else {
                continue;
            };
            let Some((to_module, to)) = deepest_file(krate, &abs) else {
                continue;
            };
            if to != file {
                out.push(Edge {
                    from: file.to_owned(),
                    to: to.to_owned(),
                    line: r.line,
                    to_module,
                    krate: k,
                });
            }
        }
        out
    }
}

/// The path `r` names, from the crate root, or `None` if it leaves the crate.
pub fn absolute(
    krate: &Crate,
    module: &[String],
    r: &PathRef,
    aliases: &BTreeMap<&str, Option<ModPath>>,
) -> Option<ModPath> {
    if r.global {
        return None;
    }
    let mut cur: ModPath = module.to_vec();
    cur.extend(r.inline.iter().cloned());
    let (first, rest) = r.segs.split_first()?;
    let mut abs = match first.as_str() {
        "crate" => Vec::new(),
        "self" | "super" => {
            let mut segs = r.segs.iter().peekable();
            while let Some(s) = segs.next_if(|s| *s == "self" || *s == "super") {
                if s == "super" {
                    cur.pop()?;
                }
            }
            cur.extend(segs.cloned());
            return Some(cur);
        }
        name => match aliases.get(name) {
            Some(target) => target.clone()?,
            None => {
                // A child module of the current module (`relay::pump` in proxy/mod.rs).
                let mut child = cur.clone();
                child.push(name.to_owned());
                if !krate.modules.keys().any(|m| m.starts_with(&child)) {
                    return None;
                }
                child
            }
        },
    };
    abs.extend(rest.iter().cloned());
    Some(abs)
}

/// The file of the longest prefix of `abs` that is a file module (the root at worst).
pub fn deepest_file<'a>(krate: &'a Crate, abs: &[String]) -> Option<(ModPath, &'a str)> {
    (0..=abs.len()).rev().find_map(|n| {
        krate
            .modules
            .get(&abs[..n])
            .map(|f| (abs[..n].to_vec(), f.as_str()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(files: &[(&str, &str)]) -> Graph {
        let files = files
            .iter()
            .map(|(p, s)| (p.to_string(), s.to_string()))
            .collect();
        Graph::build(&["a".into(), "t".into()], &files)
    }

    fn edges(g: &Graph) -> Vec<(String, String)> {
        let mut v: Vec<_> = g
            .edges
            .iter()
            .map(|e| (e.from.clone(), e.to.clone()))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    fn e(a: &str, b: &str) -> (String, String) {
        (a.into(), b.into())
    }

    #[test]
    fn modules_follow_declarations_and_path_attrs() {
        let g = graph(&[
            ("a/src/lib.rs", "pub mod proxy; mod obs;"),
            ("a/src/proxy/mod.rs", "pub mod relay;"),
            ("a/src/proxy/relay.rs", "mod pump;"),
            ("a/src/proxy/relay/pump.rs", ""),
            (
                "a/src/obs.rs",
                "#[cfg(test)]\n#[path = \"obs_tests.rs\"]\nmod tests;",
            ),
            ("a/src/obs_tests.rs", "use super::*;"),
            ("a/src/orphan.rs", ""),
        ]);
        let m = |f: &str| g.placed[&(0, f.to_owned())].join("::");
        assert_eq!(m("a/src/proxy/relay/pump.rs"), "proxy::relay::pump");
        assert_eq!(m("a/src/proxy/mod.rs"), "proxy");
        assert_eq!(m("a/src/obs_tests.rs"), "obs::tests");
        assert_eq!(m("a/src/orphan.rs"), "orphan");
        // obs_tests.rs's `super` is obs.rs, not the crate root.
        assert_eq!(edges(&g), vec![e("a/src/obs_tests.rs", "a/src/obs.rs")]);
    }

    #[test]
    fn paths_resolve_to_the_deepest_file() {
        let g = graph(&[
            ("a/src/lib.rs", "pub mod proxy; pub mod sys;"),
            (
                "a/src/proxy/mod.rs",
                "pub mod relay; pub use relay::Counts;",
            ),
            (
                "a/src/proxy/relay.rs",
                "use super::super::sys::caps; fn f() { caps::x(); }",
            ),
            (
                "a/src/sys.rs",
                "pub mod caps; fn g() { crate::proxy::relay::Counts::new(); }",
            ),
            (
                "a/src/sys/caps.rs",
                "use crate::{proxy::{self as p}, sys};\n\
              fn h() { p::relay::x(); self::y(); mod tests { use super::*; } }",
            ),
        ]);
        assert_eq!(
            edges(&g),
            vec![
                e("a/src/proxy/mod.rs", "a/src/proxy/relay.rs"),
                e("a/src/proxy/relay.rs", "a/src/sys/caps.rs"),
                e("a/src/sys.rs", "a/src/proxy/relay.rs"),
                e("a/src/sys/caps.rs", "a/src/proxy/mod.rs"),
                e("a/src/sys/caps.rs", "a/src/proxy/relay.rs"),
                e("a/src/sys/caps.rs", "a/src/sys.rs"),
            ]
        );
    }

    #[test]
    fn integration_tests_are_crates_sharing_modules() {
        let g = graph(&[
            ("t/src/lib.rs", "pub mod x;"),
            ("t/src/x.rs", ""),
            (
                "t/src/bin/tool.rs",
                "use t::x; fn main() { crate::helper(); }",
            ),
            ("t/tests/one.rs", "mod common; use common::f; fn g() {}"),
            ("t/tests/common.rs", "pub fn f() { crate::g(); }"),
            ("t/tests/util/mod.rs", ""),
        ]);
        assert_eq!(
            edges(&g),
            vec![
                e("t/tests/common.rs", "t/tests/one.rs"),
                e("t/tests/one.rs", "t/tests/common.rs"),
            ]
        );
        // common.rs is a crate of its own too, and util/ is nobody's module.
        assert!(g.crates.iter().any(|c| c.root == "t/tests/common.rs"));
        assert!(!g.placed.keys().any(|(_, f)| f == "t/tests/util/mod.rs"));
    }
}
