//! The repository speaks of the project alone: its code, docs and scripts state their
//! requirements themselves, and never point to a work tracker's numbers or to files that a
//! clone of the repository does not have.

use std::path::{Path, PathBuf};

/// Directories that hold no source of the project (build output, fuzzer data).
const SKIPPED: &[&str] = &["target", ".git", "corpus", "artifacts", "node_modules"];

/// Kinds of file a reader of the repository reads.
const TEXT: &[&str] = &[
    "rs", "md", "sh", "toml", "proto", "html", "js", "css", "yml",
];

fn files(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if !SKIPPED.contains(&name.as_ref()) {
                files(&path, found);
            }
        } else if path
            .extension()
            .is_some_and(|e| TEXT.contains(&e.to_string_lossy().as_ref()))
            || path.parent().and_then(Path::file_name) == Some(".ci".as_ref())
        {
            found.push(path);
        }
    }
}

/// The lines of `text` that name a tracker's item by number (the word issue, then a number,
/// maybe after a `#`) or a file outside the repository (the shared notes beside a checkout).
fn outside_references(text: &str) -> Vec<&str> {
    let outside = concat!("..", "/shared");
    text.lines()
        .filter(|line| {
            let lower = line.to_ascii_lowercase();
            lower.contains(outside)
                || lower.match_indices("issue").any(|(at, word)| {
                    let rest = lower[at + word.len()..].trim_start_matches('s');
                    let rest = rest.strip_prefix(' ').unwrap_or(rest);
                    let rest = rest.strip_prefix('#').unwrap_or(rest);
                    rest.starts_with(|c: char| c.is_ascii_digit())
                })
        })
        .collect()
}

#[test]
fn the_check_finds_what_it_looks_for() {
    // Written in two halves, so that this file does not hold what it looks for.
    assert_eq!(
        outside_references(concat!("see issue", " 12 for more")).len(),
        1
    );
    assert_eq!(
        outside_references(concat!("as Issues", " #3 asks")).len(),
        1
    );
    assert_eq!(outside_references(concat!("the issue", "#7 fix")).len(), 1);
    assert_eq!(
        outside_references(concat!("read ../", "shared/NOTES.md")).len(),
        1
    );
    assert!(outside_references("a known issue with 2 parts; issued 3 tokens").is_empty());
}

#[test]
fn code_and_docs_speak_of_the_project_alone() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut found = Vec::new();
    files(&root, &mut found);
    assert!(
        found.iter().any(|p| p.ends_with("README.md")),
        "the walk did not reach the repository's root"
    );
    let mut offending = Vec::new();
    for path in &found {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        for line in outside_references(&text) {
            offending.push(format!("{}: {}", path.display(), line.trim()));
        }
    }
    assert!(offending.is_empty(), "{}", offending.join("\n"));
}
