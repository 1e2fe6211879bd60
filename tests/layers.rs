//! The library's top-level modules form layers: no module reaches, through
//! `crate::` paths, a module that reaches back to it. Read from the source,
//! so a new import that closes a cycle fails here with the cycle named; and
//! the README's Layout table lists every module, each row using only the
//! rows above it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level modules `src/lib.rs` declares.
fn modules() -> BTreeSet<String> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).expect("read src/lib.rs");
    lib.lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .filter_map(|l| l.strip_suffix(';'))
        .map(str::to_string)
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("list src") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The first identifier of each comma-separated item at depth 0 of a
/// `{...}` group starting at `text[0] == '{'`.
fn group_heads(text: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut item = String::new();
    for c in text.chars() {
        match c {
            '{' => {
                depth += 1;
                if depth == 1 {
                    continue;
                }
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    heads.push(std::mem::take(&mut item));
                    break;
                }
            }
            ',' if depth == 1 => {
                heads.push(std::mem::take(&mut item));
                continue;
            }
            _ => {}
        }
        if depth == 1 {
            item.push(c);
        }
    }
    heads
        .iter()
        .filter_map(|i| {
            let name: String = i
                .trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// The top-level modules a piece of source names through `crate::`.
fn references(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        // `miehisto::crate::` does not exist; skip `$crate::` in macros.
        if text[..i].ends_with('$') {
            continue;
        }
        let rest = &text[i + "crate::".len()..];
        if rest.starts_with('{') {
            out.extend(group_heads(rest));
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.insert(name);
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules();
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> =
        mods.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for f in files {
        let rel = f.strip_prefix(src()).expect("under src");
        let first = rel.components().next().expect("a component");
        let top = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let Some(from) = edges.get_mut(&top) else {
            // lib.rs, build.rs, the binaries: not library modules.
            continue;
        };
        let text = std::fs::read_to_string(&f).expect("read a source file");
        for to in references(&text) {
            if to != top && mods.contains(&to) {
                from.insert(to);
            }
        }
    }
    edges
}

/// A cycle through the graph, if there is one (depth-first search).
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == n) {
            let mut cycle = path[at..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, edges, done, path) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|n| visit(n, edges, &mut done, &mut Vec::new()))
}

#[test]
fn the_checker_sees_imports_and_cycles() {
    let refs = references(
        "use crate::sys::{self, Wait};\nuse crate::{filter::StopSyscall, stop::{hit, tracer}};\nlet x = crate::explain::say();\n",
    );
    let want: BTreeSet<String> = ["sys", "filter", "stop", "explain"]
        .map(String::from)
        .into();
    assert_eq!(refs, want);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.insert("a".into(), ["b".to_string()].into());
    g.insert("b".into(), ["c".to_string()].into());
    g.insert("c".into(), BTreeSet::new());
    assert_eq!(find_cycle(&g), None);
    g.insert("c".into(), ["a".to_string()].into());
    assert_eq!(
        find_cycle(&g),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}

#[test]
fn top_level_modules_form_layers() {
    let edges = graph();
    assert!(
        edges.len() > 10,
        "found the modules of src/lib.rs: {edges:?}"
    );
    assert!(
        edges["stop"].contains("sys"),
        "the scan sees imports: {edges:?}"
    );
    if let Some(cycle) = find_cycle(&edges) {
        panic!(
            "import cycle among the library's modules: {} — move the shared item down to a module both may use",
            cycle.join(" → ")
        );
    }
}

/// The README's Layout table: for each row, the library modules its first
/// cell names (`src/<m>.rs` or `src/<m>/`).
fn layout_rows() -> Vec<BTreeSet<String>> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md");
    let table = readme
        .split("\n## Layout")
        .nth(1)
        .expect("README.md has a Layout section");
    let table = table.split("\n## ").next().unwrap_or(table);
    table
        .lines()
        .filter_map(|l| l.strip_prefix("| "))
        .filter_map(|l| l.split(" |").next())
        .map(|cell| {
            cell.split('`')
                .filter_map(|p| p.strip_prefix("src/"))
                .map(|p| {
                    p.trim_end_matches('/')
                        .trim_end_matches(".rs")
                        .split('/')
                        .next()
                        .unwrap_or("")
                        .to_string()
                })
                .collect()
        })
        .filter(|mods: &BTreeSet<String>| !mods.is_empty())
        .collect()
}

#[test]
fn the_readme_layout_lists_the_modules_layer_by_layer() {
    let edges = graph();
    let rows = layout_rows();
    let row_of = |m: &str| rows.iter().position(|r| r.contains(m));
    for m in edges.keys() {
        assert!(
            row_of(m).is_some(),
            "src/{m} is a library module but the README's Layout table has no row for it"
        );
    }
    for (from, tos) in &edges {
        for to in tos {
            assert!(
                row_of(to) <= row_of(from),
                "{from} uses {to}, which the README's Layout table lists below it: move the row of {to} up (each row uses only the rows above it)"
            );
        }
    }
}
