//! Smoke runs of every `pigeon bench` scenario: small, a few seconds, and nothing lost.
//! The figures themselves come from release runs recorded in docs/benchmarks.md.

use std::process::Command;

use serde_json::Value;

use crate::support::Server;

fn bench(server: &Server, pid: u32, args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_pigeon"))
        .args(["bench"])
        .args(args)
        .args([
            "--json",
            "--server",
            &server.base_url(),
            "--server-pid",
            &pid.to_string(),
        ])
        .output()
        .expect("run pigeon bench");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON object")
}

#[tokio::test]
async fn every_scenario_runs_and_loses_nothing() {
    let server = Server::start(&[
        "--rate-limit",
        "100000",
        "--rate-burst",
        "100000",
        "--auth-rate-limit",
        "100000",
    ]);
    let pid = server.pid();

    let direct = bench(
        &server,
        pid,
        &["direct", "--users", "6", "--rate", "300", "--duration", "2"],
    );
    assert!(direct["acked"].as_u64().unwrap() >= 500, "{direct}");
    for key in ["lost", "duplicated", "out_of_order", "errors"] {
        assert_eq!(direct[key], 0, "{key}: {direct}");
    }
    assert_eq!(direct["acked"], direct["delivered"]);
    assert!(direct["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    assert!(
        direct["send_lag_ms"]["p50"].as_f64().unwrap() > 0.0,
        "{direct}"
    );
    assert!(direct["server_cpu_ms_per_1000"].as_f64().is_some());

    let group = bench(
        &server,
        pid,
        &[
            "group",
            "--members",
            "20",
            "--senders",
            "2",
            "--rate",
            "20",
            "--duration",
            "2",
        ],
    );
    assert_eq!(group["lost"], 0, "{group}");
    assert_eq!(group["duplicated"], 0, "{group}");
    assert_eq!(group["sockets_lost"], 0, "{group}");
    assert_eq!(
        group["deliveries"].as_u64().unwrap(),
        group["messages"].as_u64().unwrap() * 19
    );
    // A frame reaches a socket before the bench reads it: the kernel's arrival times
    // came through, and are not later than the reads.
    let (arrived, read) = (
        group["fanout_ms"]["max"].as_f64().unwrap(),
        group["fanout_read_ms"]["max"].as_f64().unwrap(),
    );
    assert!(arrived > 0.0 && arrived <= read, "{group}");

    let connections = bench(
        &server,
        pid,
        &["connections", "--connections", "200", "--duration", "1"],
    );
    assert_eq!(
        (connections["open"].as_u64(), connections["failed"].as_u64()),
        (Some(200), Some(0)),
        "{connections}"
    );
    assert!(connections["server_rss_bytes_per_conn"].as_u64().is_some());

    let sync = bench(
        &server,
        pid,
        &["sync", "--backlog", "300", "--threads", "3"],
    );
    assert_eq!(
        (sync["synced_messages"].as_u64(), sync["lost"].as_u64()),
        (Some(300), Some(0)),
        "{sync}"
    );
}

#[tokio::test]
async fn the_bench_refuses_non_loopback_servers() {
    let output = Command::new(env!("CARGO_BIN_EXE_pigeon"))
        .args([
            "bench",
            "sync",
            "--server",
            "http://192.0.2.1:8080",
            "--backlog",
            "1",
            "--threads",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("only sends traffic to loopback"),
        "refused for the right reason: {stderr}"
    );
}
