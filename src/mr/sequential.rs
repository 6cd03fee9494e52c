//! The sequential reference implementation (the lab's `mrsequential`), used by tests.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::app::{App, Emitter, Values};
use super::error::MrError;
use super::table::TaskId;

/// Runs `app` over `inputs` the simplest possible way and writes `key value` lines, sorted by
/// key, to `output`: each file is read whole and mapped in one call, all pairs are kept in
/// memory, sorted and grouped, and the combiner is never used. It has no memory bound; it
/// exists to check the real executor against. Returns the number of lines written.
pub fn run_sequential(app: &dyn App, inputs: &[PathBuf], output: &Path) -> Result<u64, MrError> {
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let name = input
            .to_str()
            .ok_or_else(|| MrError::NonUtf8Path(input.clone()))?;
        let contents = std::fs::read(input).map_err(|e| MrError::io("read input", input, e))?;
        let mut sink = |key: &[u8], value: &[u8]| pairs.push((key.to_vec(), value.to_vec()));
        app.map(name, &contents, &mut Emitter::new(&mut sink))
            .map_err(|e| MrError::App {
                app: app.name().to_string(),
                task: TaskId::Map(i as u32),
                message: format!("map: {e}"),
            })?;
    }
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let file = std::fs::File::create(output).map_err(|e| MrError::io("create", output, e))?;
    let mut writer = BufWriter::new(file);
    let io = |e| MrError::io("write", output, e);
    let mut lines = 0;
    let mut value = Vec::new();
    for group in pairs.chunk_by(|a, b| a.0 == b.0) {
        let key = &group[0].0;
        let group_values: Vec<&[u8]> = group.iter().map(|(_, v)| v.as_slice()).collect();
        let mut source = group_values.iter();
        value.clear();
        app.reduce(key, &mut Values::new(&mut source), &mut value)
            .map_err(|e| MrError::App {
                app: app.name().to_string(),
                task: TaskId::Reduce(0),
                message: format!("reduce: {e}"),
            })?;
        writer.write_all(key).map_err(io)?;
        writer.write_all(b" ").map_err(io)?;
        writer.write_all(&value).map_err(io)?;
        writer.write_all(b"\n").map_err(io)?;
        lines += 1;
    }
    writer.flush().map_err(io)?;
    Ok(lines)
}
