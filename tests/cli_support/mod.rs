//! Helpers shared by the tests that run the `raftkv` binary as a process.

#![allow(dead_code)] // Each test binary uses a different part of the helpers.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output};
use std::time::Duration;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_raftkv");

/// The numeric cluster id the binary derives from a cluster name (FNV-1a 64).
pub fn cluster_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Runs `raftkv ARGS` to completion (without the caller's `RUST_LOG`).
pub fn raftkv(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run raftkv")
}

/// The process's stdout, which must be UTF-8.
pub fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("utf-8 stdout")
}

/// The process's stderr, lossily.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `text` parsed as one JSON document.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text)
        .unwrap_or_else(|error| panic!("not one JSON document ({error}): {text:?}"))
}

/// The first line `child` prints on its piped stdout, or `None` if it prints
/// none within `timeout` (read on a thread, so a silent process fails the
/// test at the bound instead of hanging it).
pub fn first_line(child: &mut Child, timeout: Duration) -> Option<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (line_sender, line) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut first = String::new();
        let _ = BufReader::new(stdout).read_line(&mut first);
        let _ = line_sender.send(first);
    });
    line.recv_timeout(timeout).ok()
}
