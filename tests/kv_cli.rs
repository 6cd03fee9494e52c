//! The key/value commands of the `raftkv` binary, run as processes over TCP
//! loopback: `kvsrv` (port 0, `listening on` line, SIGTERM and SIGKILL,
//! restart on the same directory), `put`/`get` (text, JSON, exit codes),
//! `lock acquire|release`, and `inspect` decoding key/value commands.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use raftkv::kv::{Clerk, ClerkConfig, EndpointRpc, KvCommand, KvError};
use raftkv::net::tcp::{TcpConfig, TcpTransport};
use raftkv::raft::{Entry, EntryKind};
use raftkv::storage::{RaftLogStorage, Store};

mod cli_support;

use cli_support::{BIN, cluster_id, first_line, json, raftkv, stderr, stdout};

/// A running `raftkv kvsrv` process; killed when dropped.
struct ServerProcess {
    child: Child,
    address: String,
}

impl ServerProcess {
    fn start(dir: &Path) -> Self {
        let mut child = Command::new(BIN)
            .args(["kvsrv", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kvsrv");
        let first = first_line(&mut child, Duration::from_secs(60))
            .expect("kvsrv printed no line within 60 s");
        let Some(address) = first.trim_end().strip_prefix("listening on ") else {
            let output = child.wait_with_output().expect("kvsrv output");
            panic!(
                "kvsrv printed {first:?}; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let address = address.to_owned();
        ServerProcess { child, address }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Sends SIGTERM and waits for the exit; returns the process output.
    fn terminate(mut self) -> Output {
        self.signal("-TERM");
        let child = std::mem::replace(&mut self.child, dummy_child());
        child.wait_with_output().expect("kvsrv exit")
    }

    /// Sends SIGKILL and waits until the process is gone.
    fn kill(mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
    }
}

/// A finished process to put in place of a child that was waited for.
fn dummy_child() -> Child {
    let mut child = Command::new("true").spawn().expect("spawn true");
    let _ = child.wait();
    child
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a client command (such as "get" or "lock acquire") against `server`
/// and returns (exit code, stdout).
fn client(server: &ServerProcess, command: &str, args: &[&str]) -> (i32, String) {
    let mut full: Vec<&str> = command.split(' ').collect();
    full.extend(["--servers", &server.address]);
    full.extend_from_slice(args);
    let output = raftkv(&full);
    let code = output.status.code().expect("exited normally");
    (code, stdout(&output))
}

// put/get print the outcome and exit 0/3/4/5 (text and --json); SIGTERM stops the server cleanly
// (exit 0) and a server restarted on the same directory serves the same values and versions.
#[test]
fn put_get_exit_codes_json_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    assert_eq!(client(&server, "get", &["k"]), (4, "ErrNoKey\n".into()));
    assert_eq!(
        client(&server, "put", &["k", "v1", "--version", "1"]),
        (4, "ErrNoKey\n".into())
    );
    assert_eq!(
        client(&server, "put", &["k", "v1", "--version", "0"]),
        (0, "OK\n".into())
    );
    assert_eq!(
        client(&server, "put", &["k", "nope", "--version", "0"]),
        (3, "ErrVersion\n".into())
    );
    assert_eq!(client(&server, "get", &["k"]), (0, "v1\n".into()));
    let (code, out) = client(
        &server,
        "put",
        &["k", "-v2 with spaces", "--version", "1", "--json"],
    );
    assert_eq!((code, json(&out)), (0, serde_json::json!({"result": "OK"})));
    let (code, out) = client(&server, "put", &["k", "x", "--version", "7", "--json"]);
    assert_eq!(
        (code, json(&out)),
        (3, serde_json::json!({"result": "ErrVersion"}))
    );
    let (code, out) = client(&server, "put", &["other", "x", "--version", "7", "--json"]);
    assert_eq!(
        (code, json(&out)),
        (4, serde_json::json!({"result": "ErrNoKey"}))
    );
    let (code, out) = client(&server, "get", &["k", "--json"]);
    assert_eq!(
        (code, json(&out)),
        (
            0,
            serde_json::json!({"key": "k", "value": "-v2 with spaces", "version": 2})
        )
    );
    let (code, out) = client(&server, "get", &["missing", "--json"]);
    assert_eq!(
        (code, json(&out)),
        (4, serde_json::json!({"result": "ErrNoKey"}))
    );
    assert_eq!(
        client(&server, "put", &["empty", "", "--version", "0"]),
        (0, "OK\n".into())
    );
    assert_eq!(client(&server, "get", &["empty"]), (0, "\n".into()));

    let output = server.terminate();
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    let server = ServerProcess::start(dir.path());
    let (code, out) = client(&server, "get", &["k", "--json"]);
    assert_eq!(
        (code, json(&out)),
        (
            0,
            serde_json::json!({"key": "k", "value": "-v2 with spaces", "version": 2})
        )
    );
    assert_eq!(
        client(&server, "put", &["k", "v3", "--version", "1"]),
        (3, "ErrVersion\n".into())
    );
    assert_eq!(
        client(&server, "put", &["k", "v3", "--version", "2"]),
        (0, "OK\n".into())
    );
    let output = server.terminate();
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
}

// Usage errors exit 2; an unreachable server, a wrong cluster name or a timeout exit 1 with a
// message (and a JSON error object with --json).
#[test]
fn usage_errors_and_failures() {
    for args in [
        &["put", "--servers", "127.0.0.1:1", "k", "v"][..],
        &[
            "put",
            "--servers",
            "127.0.0.1:1",
            "k",
            "v",
            "--version",
            "x",
        ],
        &["get", "k"],
        &["lock", "release", "--servers", "127.0.0.1:1", "l"],
        &["lock", "steal", "--servers", "127.0.0.1:1", "l"],
    ] {
        let output = raftkv(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    // Port 1 on loopback refuses connections.
    let output = raftkv(&[
        "get",
        "--servers",
        "127.0.0.1:1",
        "k",
        "--timeout-ms",
        "300",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("no server answered within 300 ms"),
        "{}",
        stderr(&output)
    );
    // Just that line: the transport's reconnect warnings are not a client's.
    assert_eq!(stderr(&output).lines().count(), 1, "{}", stderr(&output));
    let output = raftkv(&[
        "put",
        "--servers",
        "127.0.0.1:1",
        "k",
        "v",
        "--version",
        "0",
        "--timeout-ms",
        "300",
        "--json",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let error = json(&stdout(&output));
    assert_eq!(error["result"], "Error");
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .contains("may or may not have been applied")
    );

    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let (code, _) = client(
        &server,
        "get",
        &["k", "--cluster-id", "another", "--timeout-ms", "300"],
    );
    assert_eq!(
        code, 1,
        "a server of another cluster must refuse the client"
    );
}

// lock acquire prints "OWNER TOKEN"; a held lock makes another acquire time out (exit 1); a
// release by another owner changes nothing; the owner's release frees it; tokens grow; a leased
// lock whose holder went away is taken over after the lease.
#[test]
fn lock_acquire_release() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let (code, out) = client(&server, "lock acquire", &["l"]);
    assert_eq!(code, 0);
    let fields: Vec<&str> = out.split_whitespace().collect();
    let [owner, token] = fields[..] else {
        panic!("acquire printed {out:?}");
    };
    let token: u64 = token.parse().expect("numeric token");
    assert!(!owner.is_empty());
    // Re-acquiring with the same owner returns at once with the same token.
    let (code, out) = client(&server, "lock acquire", &["l", "--owner", owner]);
    assert_eq!((code, out), (0, format!("{owner} {token}\n")));
    let (code, _) = client(&server, "lock acquire", &["l", "--timeout-ms", "300"]);
    assert_eq!(code, 1, "acquired a held lock");
    let (code, out) = client(&server, "lock release", &["l", "--owner", "somebody-else"]);
    assert_eq!((code, out), (0, "released\n".into()));
    let (code, _) = client(&server, "lock acquire", &["l", "--timeout-ms", "300"]);
    assert_eq!(code, 1, "another owner's release freed the lock");
    let (code, out) = client(&server, "lock release", &["l", "--owner", owner, "--json"]);
    assert_eq!(code, 0);
    assert_eq!(
        json(&out),
        serde_json::json!({"lock": "l", "owner": owner, "result": "released"})
    );
    let (code, out) = client(&server, "lock acquire", &["l", "--owner", "b", "--json"]);
    assert_eq!(code, 0);
    let grant = json(&out);
    assert_eq!(grant["owner"], "b");
    assert!(grant["token"].as_u64().unwrap() > token);
    // The lock key holds the record, readable with get.
    let (code, out) = client(&server, "get", &["l", "--json"]);
    assert_eq!(code, 0);
    assert!(json(&out)["value"].as_str().unwrap().contains("\"b\""));

    let (code, out) = client(
        &server,
        "lock acquire",
        &["leased", "--lease-ms", "300", "--json"],
    );
    assert_eq!(code, 0);
    let first = json(&out);
    let (code, out) = client(
        &server,
        "lock acquire",
        &["leased", "--lease-ms", "300", "--json"],
    );
    assert_eq!(code, 0, "the lease was not taken over");
    let second = json(&out);
    assert_ne!(first["owner"], second["owner"]);
    assert!(second["token"].as_u64() > first["token"].as_u64());
}

// A server killed with SIGKILL while clients put loses no acknowledged put: after a restart on
// the same directory every key is at least at its last acknowledged version, with that value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_put() {
    const CLIENTS: u64 = 8;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let address = server.address.parse().expect("socket address");
    let mut config = TcpConfig::client(cluster_id("raftkv"), 1 << 62);
    config.peers.insert(1, address);
    let transport = TcpTransport::start(config).await.expect("client transport");
    let clerk = Arc::new(
        Clerk::new(
            EndpointRpc::new(transport.endpoint(), Duration::from_secs(2)),
            vec![1],
            ClerkConfig::default(),
        )
        .unwrap(),
    );
    // Per key: the last acknowledged (version, value).
    let acked: Arc<Mutex<HashMap<String, (u64, String)>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..CLIENTS {
        let clerk = clerk.clone();
        let acked = acked.clone();
        tasks.spawn(async move {
            let key = format!("key-{client}");
            let mut version = 0;
            loop {
                let value = format!("{client}.{version}");
                match clerk.put(&key, Bytes::from(value.clone()), version).await {
                    Ok(()) => {
                        version += 1;
                        acked.lock().unwrap().insert(key.clone(), (version, value));
                    }
                    Err(KvError::Maybe | KvError::Version) => {
                        version = clerk.get(&key).await.map_or(0, |found| found.version);
                    }
                    Err(other) => panic!("put failed: {other:?}"),
                }
            }
        });
    }
    // Let the clients get a good number of puts acknowledged, then kill the server mid-stream.
    loop {
        let total: u64 = acked
            .lock()
            .unwrap()
            .values()
            .map(|(version, _)| version)
            .sum();
        if total >= 400 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill();
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let acked = acked.lock().unwrap().clone();
    let server = ServerProcess::start(dir.path());
    for (key, (version, value)) in &acked {
        let (code, out) = client(&server, "get", &[key, "--json"]);
        assert_eq!(code, 0, "{key} lost");
        let found = json(&out);
        let found_version = found["version"].as_u64().unwrap();
        // A put in flight at the kill may or may not have landed: at most one more version.
        assert!(
            found_version == *version || found_version == version + 1,
            "{key}: acknowledged version {version}, found {found_version}"
        );
        if found_version == *version {
            assert_eq!(found["value"], value.as_str(), "{key}");
        }
    }
    drop(server);
}

// `raftkv inspect` decodes key/value commands in log entries and falls back to hex otherwise.
#[test]
fn inspect_decodes_kv_commands() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        let put = KvCommand::Put {
            key: "user/1".into(),
            value: Bytes::from("x".repeat(60)),
            version: 4,
        };
        let entries = [
            put.encode(),
            KvCommand::Get { key: "k\n".into() }.encode(),
            Bytes::from_static(b"\x07not a command"),
        ];
        let entries: Vec<Entry> = entries
            .into_iter()
            .enumerate()
            .map(|(i, data)| Entry {
                index: i as u64 + 1,
                term: 1,
                kind: EntryKind::Normal,
                data,
            })
            .collect();
        store.append(0, &entries).unwrap();
    }
    let path = dir.path().to_str().unwrap();
    let output = raftkv(&["inspect", path, "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report = json(&stdout(&output));
    let decoded: Vec<&serde_json::Value> = report["raft_groups"][0]["last_entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| &entry["decoded"])
        .collect();
    assert_eq!(
        *decoded[0],
        serde_json::json!({
            "type": "kv_put", "key": "user/1", "version": 4, "value_bytes": 60,
            "value_prefix": "x".repeat(48), "truncated": true,
        })
    );
    assert_eq!(
        *decoded[1],
        serde_json::json!({"type": "kv_get", "key": "k\\n"})
    );
    assert_eq!(decoded[2]["type"], "opaque");
    assert_eq!(decoded[2]["hex_prefix"], "076e6f74206120636f6d6d616e64");
    let output = raftkv(&["inspect", path]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.contains(&format!(
            "index 1  term 1  normal  {} bytes  kv put \"user/1\" version 4 value (60 bytes) \"{}...\"",
            report["raft_groups"][0]["last_entries"][0]["data_bytes"],
            "x".repeat(48)
        )),
        "{text}"
    );
    assert!(
        text.contains("index 2  term 1  normal  5 bytes  kv get \"k\\n\""),
        "{text}"
    );
    assert!(text.contains("hex 076e6f74"), "{text}");
}

// `raftkv bench` runs a closed loop against a server: every workload completes operations,
// reports the figures it promises (text and one JSON object), and `--check` finds the recorded
// history linearizable, including contended puts on fewer keys than clients; bad flags are
// usage errors.
#[test]
fn bench_reports_figures_and_checks_linearizability() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServerProcess::start(dir.path());
    for (workload, clients, keys) in [("put", "4", "8"), ("get", "3", "5"), ("mixed", "8", "2")] {
        let (code, out) = client(
            &server,
            "bench",
            &[
                "--clients",
                clients,
                "--keys",
                keys,
                "--duration",
                "300ms",
                "--workload",
                workload,
                "--value-size",
                "64",
                "--check",
                "--json",
            ],
        );
        assert_eq!(code, 0, "bench {workload}: {out}");
        let report = json(out.trim());
        let ops = report["ops"].as_u64().expect("ops");
        assert!(ops > 0, "bench {workload} completed no operation: {out}");
        assert_eq!(report["workload"], workload);
        assert_eq!(report["clients"].as_u64(), Some(clients.parse().unwrap()));
        let counts = &report["counts"];
        assert_eq!(
            counts["puts"].as_u64().unwrap() + counts["gets"].as_u64().unwrap(),
            ops
        );
        match workload {
            "put" => assert_eq!(counts["gets"], 0),
            "get" => assert_eq!(counts["puts"], 0),
            _ => {}
        }
        // Owned keys never conflict; the preloaded get keys always exist.
        if workload != "mixed" {
            assert_eq!(counts["err_version"], 0, "{out}");
        }
        assert_eq!(counts["err_no_key"], 0, "{out}");
        assert_eq!(report["errors"], 0, "{out}");
        let latency = &report["latency_us"];
        let (p50, p99, max) = (
            latency["p50"].as_u64().unwrap(),
            latency["p99"].as_u64().unwrap(),
            latency["max"].as_u64().unwrap(),
        );
        assert!(0 < p50 && p50 <= p99 && p99 <= max, "{out}");
        let verdict = report["linearizable"].as_str().expect("--check verdict");
        assert!(verdict.starts_with("ok"), "{out}");
    }
    let (code, out) = client(&server, "bench", &["--clients", "2", "--duration", "200ms"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ops/s") && out.contains("p99"), "{out}");
    for bad in [
        ["--clients", "0"],
        ["--duration", "soon"],
        ["--workload", "delete"],
    ] {
        let mut args = vec!["bench", "--servers", &server.address];
        args.extend(bad);
        let output = raftkv(&args);
        assert_ne!(output.status.code(), Some(0), "bench {bad:?} succeeded");
        assert!(!stderr(&output).is_empty(), "bench {bad:?} said nothing");
    }
    drop(server);
}
