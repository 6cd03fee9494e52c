//! Helpers shared by the MapReduce test binaries (`tests/mr.rs`, `tests/mr_lab1.rs`).

use std::path::{Path, PathBuf};

/// The eight Gutenberg texts of `../shared/data/gutenberg`, sorted by path.
pub fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/gutenberg");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 8, "the corpus has eight texts");
    files
}

/// The lab's comparison: all `mr-out*` lines of `dir`, blank lines dropped, sorted.
pub fn job_lines(dir: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("mr-out") {
            let text = String::from_utf8(std::fs::read(&path).unwrap()).unwrap();
            lines.extend(text.lines().filter(|l| !l.is_empty()).map(String::from));
        }
    }
    lines.sort();
    lines
}
