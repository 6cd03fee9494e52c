//! Planning map tasks: one per input file, more for files larger than the split size.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::MrError;

/// The input of one map task: bytes `start..end` of the file `path`.
///
/// `start` is 0 or just after a newline, and `end` is just after a newline or the file's size,
/// so a split always holds whole lines. An empty file is one empty split (map still runs once).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapSplit {
    /// The input file, exactly as given to the job; map receives it as `filename`.
    pub path: String,
    /// First byte of the split.
    pub start: u64,
    /// One past the last byte of the split.
    pub end: u64,
}

impl MapSplit {
    /// Number of bytes in the split.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the split holds no bytes (only for an empty file).
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// Bytes read at a time while looking for the newline that ends a split.
const SCAN_BLOCK_BYTES: usize = 64 * 1024;

/// Splits every input into map tasks of about `split_bytes`, cut just after a newline.
///
/// A split ends after the first newline at or beyond `start + split_bytes - 1`, so splits are at
/// least `split_bytes` long (except the last of a file) and never cut a line; a file without
/// newlines past that point stays one split. Fails if an input is missing, is not a regular
/// file, or its path is not UTF-8.
pub fn plan_splits(inputs: &[PathBuf], split_bytes: u64) -> Result<Vec<MapSplit>, MrError> {
    plan(inputs, split_bytes, None)
}

/// Like [`plan_splits`], but a file larger than `split_bytes_max` is cut into pieces of equal
/// size (up to the end of a line), as many as it takes to keep them at most `split_bytes_max`
/// long, rounded up to a multiple of `workers`: the map tasks of a large input then come in
/// whole rounds of equally long tasks, instead of a last short round that leaves workers idle.
/// Files no larger than `split_bytes_max` stay one split each, as in [`plan_splits`].
pub fn plan_splits_balanced(
    inputs: &[PathBuf],
    split_bytes_max: u64,
    workers: usize,
) -> Result<Vec<MapSplit>, MrError> {
    if workers == 0 {
        return Err(MrError::Config("workers must be positive".into()));
    }
    plan(inputs, split_bytes_max, Some(workers as u64))
}

/// Plans the splits; with `pieces_multiple`, a file over `split_bytes` is cut into a multiple
/// of that many pieces of equal size instead of pieces of `split_bytes` and a remainder.
fn plan(
    inputs: &[PathBuf],
    split_bytes: u64,
    pieces_multiple: Option<u64>,
) -> Result<Vec<MapSplit>, MrError> {
    if split_bytes == 0 {
        return Err(MrError::Config("split_bytes must be positive".into()));
    }
    let mut splits = Vec::new();
    for input in inputs {
        let name = input
            .to_str()
            .ok_or_else(|| MrError::NonUtf8Path(input.clone()))?
            .to_string();
        let metadata = std::fs::metadata(input)
            .map_err(|e| MrError::io("read metadata of input", input, e))?;
        if !metadata.is_file() {
            return Err(MrError::NotAFile(input.clone()));
        }
        let size = metadata.len();
        if size <= split_bytes {
            splits.push(MapSplit {
                path: name,
                start: 0,
                end: size,
            });
            continue;
        }
        let piece_bytes = match pieces_multiple {
            None => split_bytes,
            Some(multiple) => {
                let pieces = size.div_ceil(split_bytes).next_multiple_of(multiple);
                size.div_ceil(pieces)
            }
        };
        let mut file = File::open(input).map_err(|e| MrError::io("open input", input, e))?;
        let mut start = 0;
        while start < size {
            let target = start + piece_bytes;
            let end = if target >= size {
                size
            } else {
                next_line_end(&mut file, input, target - 1, size)?
            };
            splits.push(MapSplit {
                path: name.clone(),
                start,
                end,
            });
            start = end;
        }
    }
    Ok(splits)
}

/// The offset just after the first newline at or after `from`, or `size` if there is none.
fn next_line_end(file: &mut File, path: &Path, from: u64, size: u64) -> Result<u64, MrError> {
    file.seek(SeekFrom::Start(from))
        .map_err(|e| MrError::io("seek in input", path, e))?;
    let mut block = vec![0u8; SCAN_BLOCK_BYTES];
    let mut offset = from;
    while offset < size {
        let read = file
            .read(&mut block)
            .map_err(|e| MrError::io("read input", path, e))?;
        if read == 0 {
            break;
        }
        if let Some(i) = memchr::memchr(b'\n', &block[..read]) {
            return Ok((offset + i as u64 + 1).min(size));
        }
        offset += read as u64;
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_one(contents: &[u8], split_bytes: u64) -> Vec<(u64, u64)> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("input.txt");
        std::fs::write(&path, contents).unwrap();
        plan_splits(&[path], split_bytes)
            .unwrap()
            .into_iter()
            .map(|s| (s.start, s.end))
            .collect()
    }

    // Proves splits tile the file exactly and every cut falls just after a newline.
    #[test]
    fn splits_tile_the_file_at_line_boundaries() {
        let mut contents = Vec::new();
        for i in 0..500 {
            contents.extend_from_slice(format!("line {i} {}\n", "x".repeat(i % 37)).as_bytes());
        }
        contents.extend_from_slice(b"last line without newline");
        for split_bytes in [1, 7, 64, 100, 1000, 5000, contents.len() as u64] {
            let splits = plan_one(&contents, split_bytes);
            assert_eq!(splits.first().unwrap().0, 0);
            assert_eq!(splits.last().unwrap().1, contents.len() as u64);
            for pair in splits.windows(2) {
                assert_eq!(pair[0].1, pair[1].0, "splits must be contiguous");
            }
            for &(start, end) in &splits {
                assert!(start < end, "no empty splits in a non-empty file");
                if end < contents.len() as u64 {
                    assert_eq!(contents[end as usize - 1], b'\n', "cut after a newline");
                    assert!(end - start >= split_bytes, "splits reach the split size");
                }
            }
        }
    }

    // Proves balanced planning cuts a large file into a multiple of W pieces of equal size (to
    // the line), none over the maximum, tiling the file at line boundaries, and keeps smaller
    // files whole.
    #[test]
    fn balanced_splits_come_in_whole_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let mut contents = Vec::new();
        for i in 0..2000 {
            contents.extend_from_slice(format!("line {i} {}\n", "y".repeat(i % 23)).as_bytes());
        }
        let large = dir.path().join("large.txt");
        std::fs::write(&large, &contents).unwrap();
        let small = dir.path().join("small.txt");
        std::fs::write(&small, b"one\ntwo\n").unwrap();
        let size = contents.len() as u64;
        for (max, workers) in [(size / 5, 2), (size / 5, 4), (size / 2, 3), (size, 2)] {
            let splits =
                plan_splits_balanced(&[large.clone(), small.clone()], max, workers).unwrap();
            let (pieces, rest) = splits.split_at(splits.len() - 1);
            assert_eq!(
                (rest[0].start, rest[0].end),
                (0, 8),
                "the small file stays whole"
            );
            if max >= size {
                assert_eq!(pieces.len(), 1, "a file within the maximum stays whole");
                continue;
            }
            assert_eq!(pieces.len() % workers, 0, "max {max}, {workers} workers");
            assert_eq!(pieces.first().unwrap().start, 0);
            assert_eq!(pieces.last().unwrap().end, size);
            let even = size / pieces.len() as u64;
            for pair in pieces.windows(2) {
                assert_eq!(pair[0].end, pair[1].start, "splits must be contiguous");
            }
            for piece in pieces {
                assert!(piece.len() <= max, "piece of {} over {max}", piece.len());
                if piece.end < size {
                    assert_eq!(
                        contents[piece.end as usize - 1],
                        b'\n',
                        "cut after a newline"
                    );
                    assert!(piece.len().abs_diff(even) < 64, "{} vs {even}", piece.len());
                }
            }
        }
        assert!(matches!(
            plan_splits_balanced(&[large], 10, 0),
            Err(MrError::Config(_))
        ));
    }

    // Proves a small file is one split and an empty file is one empty split.
    #[test]
    fn small_and_empty_files_are_one_split() {
        assert_eq!(plan_one(b"a\nb\n", 100), vec![(0, 4)]);
        assert_eq!(plan_one(b"", 100), vec![(0, 0)]);
    }

    // Proves a file with no newline after the split point stays whole.
    #[test]
    fn file_without_newlines_stays_whole() {
        assert_eq!(plan_one(&[b'a'; 1000], 10), vec![(0, 1000)]);
        assert_eq!(plan_one(b"ab\ncdefghijkl", 2), vec![(0, 3), (3, 13)]);
    }

    // Proves missing inputs and directories are clear errors.
    #[test]
    fn bad_inputs_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.txt");
        match plan_splits(std::slice::from_ref(&missing), 10) {
            Err(MrError::Io { path, .. }) => assert_eq!(path, missing),
            other => panic!("expected Io error, got {other:?}"),
        }
        assert!(matches!(
            plan_splits(&[dir.path().to_path_buf()], 10),
            Err(MrError::NotAFile(_))
        ));
        assert!(matches!(plan_splits(&[], 0), Err(MrError::Config(_))));
    }
}
