//! hsmd's modules depend on each other one way: no import cycles between the
//! top-level modules of `hsmd/src`, so each can be read (and tested) knowing
//! only what it depends on.

// A test: a failure is a panic with the reason.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

fn source_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).expect("read hsmd/src").flatten() {
        let path = entry.path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without its test module (tests
/// may use anything).
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Top-level module → the top-level modules it names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let top = |p: &Path| -> String {
        let rel = p.strip_prefix(&src).expect("under src");
        let first = rel
            .components()
            .next()
            .expect("a component")
            .as_os_str()
            .to_string_lossy()
            .into_owned();
        first.trim_end_matches(".rs").to_owned()
    };
    let modules: BTreeSet<String> = files
        .iter()
        .map(|p| top(p))
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let from = top(file);
        if !modules.contains(&from) {
            continue;
        }
        let code = code(&fs::read_to_string(file).expect("read"));
        let mut named = BTreeSet::new();
        // `crate::x::…` anywhere, and `use crate::{x::…, y, …}`.
        for part in code.split("crate::").skip(1) {
            if let Some(rest) = part.strip_prefix('{') {
                let group = rest.split("};").next().unwrap_or("");
                for item in group.split(',') {
                    let word: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    named.insert(word);
                }
            } else {
                named.insert(part.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect());
            }
        }
        let edges = graph.entry(from.clone()).or_default();
        edges.extend(named.into_iter().filter(|m| modules.contains(m) && *m != from));
    }
    graph
}

/// The sets of modules that reach each other (Tarjan), larger than one.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<Vec<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        found: BTreeSet<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        for w in s.graph.get(v).into_iter().flatten() {
            if !s.index.contains_key(w.as_str()) {
                visit(s, w);
                let lw = s.low[w.as_str()];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.stack.contains(&w.as_str()) {
                let iw = s.index[w.as_str()];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut set = Vec::new();
            while let Some(w) = s.stack.pop() {
                set.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if set.len() > 1 {
                set.sort();
                s.found.insert(set);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: BTreeSet::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found
}

#[test]
fn no_new_import_cycle_between_hsmds_modules() {
    let graph = graph();
    assert!(graph.len() > 10, "the module graph was not read: {graph:?}");
    let found = cycles(&graph);
    assert!(
        found.is_empty(),
        "modules that import each other (directly or round about): {found:?}\nthe graph: {graph:#?}"
    );
}

#[test]
fn hsmctl_depends_on_the_client_library_only() {
    let manifest = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../hsmctl/Cargo.toml"))
        .expect("hsmctl/Cargo.toml");
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .and_then(|d| d.split("\n[").next())
        .unwrap_or("");
    assert!(
        !deps.lines().any(|l| l.trim_start().starts_with("hsmd")),
        "hsmctl depends on the daemon's crate:\n{deps}"
    );
    assert!(deps.lines().any(|l| l.starts_with("protocol")), "{deps}");
}
