//! sandboxd benchmark: `/exec` latency, output streaming, file streaming,
//! idle memory and binary size. Prints a Markdown table for BENCHMARKS.md.
//!
//! Measures the binary named by `SANDBOXD_BIN` (the static release build,
//! as shipped into sandboxes) or else the one Cargo built for this bench:
//!
//! ```text
//! RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p hutch-sandboxd --target x86_64-unknown-linux-gnu
//! SANDBOXD_BIN=target/x86_64-unknown-linux-gnu/release/sandboxd cargo bench -p hutch-sandboxd --bench sandboxd
//! ```

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio::net::TcpStream;

const EXEC_RUNS: usize = 2000;
const FILE_BYTES: u64 = 1 << 30;
const STREAM_BYTES: u64 = 1 << 30;

struct Daemon {
    child: std::process::Child,
    addr: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(binary: &str) -> Daemon {
    let mut child = Command::new(binary)
        .args(["--listen", "tcp:127.0.0.1:0", "--output-limit", "67108864"])
        // As the sandbox driver starts it.
        .args(["--child-oom-score-adj", "1000"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start sandboxd");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr =
        line.trim().strip_prefix("sandboxd listening on tcp:").expect("listening line").to_owned();
    Daemon { child, addr }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap()
}

type Sender = hyper::client::conn::http1::SendRequest<
    http_body_util::combinators::BoxBody<Bytes, std::io::Error>,
>;

async fn connect(addr: &str) -> Sender {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    sender
}

fn full(body: impl Into<Bytes>) -> http_body_util::combinators::BoxBody<Bytes, std::io::Error> {
    Full::new(body.into()).map_err(|never| match never {}).boxed()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let binary =
        std::env::var("SANDBOXD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_sandboxd").to_owned());
    let size = std::fs::metadata(&binary).unwrap().len();
    let daemon = start(&binary);
    let mut sender = connect(&daemon.addr).await;
    let mut rows: Vec<(String, String)> = Vec::new();

    // Idle memory: after start-up and one request, once it has settled.
    let health = hyper::Request::get("/health").header("host", "x").body(full("")).unwrap();
    sender.send_request(health).await.unwrap().into_body().collect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = rss_kib(daemon.child.id());

    // Baseline: what a bare fork+exec+wait of `true` costs from Rust here.
    let mut bare = Vec::with_capacity(500);
    for _ in 0..500 {
        let started = Instant::now();
        Command::new("true").status().unwrap();
        bare.push(started.elapsed());
    }
    bare.sort();

    // POST /exec of `true` over one keep-alive connection.
    let body = r#"{"command":"true"}"#;
    let mut latencies = Vec::with_capacity(EXEC_RUNS);
    for i in 0..EXEC_RUNS + 100 {
        let request = hyper::Request::post("/exec")
            .header("host", "x")
            .header("content-type", "application/json")
            .body(full(body))
            .unwrap();
        let started = Instant::now();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
        if i >= 100 {
            latencies.push(started.elapsed());
        }
    }
    latencies.sort();

    // Output streaming: a process writes 1 GiB to stdout; a WebSocket
    // attach from offset 0 receives it live (binary frames).
    let url = format!("ws://{}/processes/streamer/attach", daemon.addr);
    let start_request = serde_json::json!({
        "command": "sh",
        "args": ["-c", format!("sleep 0.2; head -c {STREAM_BYTES} /dev/zero")],
        "tag": "streamer",
    });
    let request = hyper::Request::post("/processes")
        .header("host", "x")
        .header("content-type", "application/json")
        .body(full(start_request.to_string()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 201);
    response.into_body().collect().await.unwrap();
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let (mut received, mut dropped) = (0u64, 0u64);
    let mut first = None;
    while let Some(message) = socket.next().await {
        match message.unwrap() {
            tokio_tungstenite::tungstenite::Message::Binary(frame) => {
                first.get_or_insert_with(Instant::now);
                received += frame.len() as u64 - 1;
            }
            tokio_tungstenite::tungstenite::Message::Text(text) => {
                let event: serde_json::Value = serde_json::from_str(&text).unwrap();
                if event["type"] == "dropped" {
                    dropped += event["bytes"].as_u64().unwrap();
                }
                if event["type"] == "exit" {
                    break;
                }
            }
            _ => {}
        }
    }
    let stream_secs = first.map_or(f64::NAN, |t| t.elapsed().as_secs_f64());

    // Files: 1 GiB up and down through a tmpfs, so the disk is not measured.
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let path = dir.path().join("big");
    let chunk = Bytes::from(vec![0x5a; 1 << 20]);
    let chunks = futures_util::stream::iter(
        (0..FILE_BYTES >> 20).map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone()))),
    );
    let request = hyper::Request::put(format!("/files?path={}", path.display()))
        .header("host", "x")
        .body(BodyExt::boxed(StreamBody::new(chunks)))
        .unwrap();
    let started = Instant::now();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    let upload_secs = started.elapsed().as_secs_f64();
    let request = hyper::Request::get(format!("/files?path={}", path.display()))
        .header("host", "x")
        .body(full(""))
        .unwrap();
    let started = Instant::now();
    let response = sender.send_request(request).await.unwrap();
    let mut body = response.into_body();
    let mut downloaded = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            downloaded += data.len() as u64;
        }
    }
    let download_secs = started.elapsed().as_secs_f64();
    assert_eq!(downloaded, FILE_BYTES);
    let peak_rss = std::fs::read_to_string(format!("/proc/{}/status", daemon.child.id()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().to_owned()))
        .unwrap();

    let gbps = |bytes: u64, secs: f64| format!("{:.2} GB/s", bytes as f64 / secs / 1e9);
    rows.push(("binary".into(), binary.clone()));
    rows.push(("binary size".into(), format!("{:.2} MiB", size as f64 / (1 << 20) as f64)));
    rows.push(("idle RSS".into(), format!("{:.2} MiB", idle_rss as f64 / 1024.0)));
    rows.push((
        "bare fork+exec+wait of `true` (baseline) p50 / p99".into(),
        format!("{:.3} ms / {:.3} ms", percentile(&bare, 0.5), percentile(&bare, 0.99)),
    ));
    rows.push((
        format!("`POST /exec` of `true`, {EXEC_RUNS} runs, p50 / p99"),
        format!("{:.3} ms / {:.3} ms", percentile(&latencies, 0.5), percentile(&latencies, 0.99)),
    ));
    rows.push((
        "output streaming over WebSocket (1 GiB from `head -c`)".into(),
        format!(
            "{} delivered, {} dropped by the 64 MiB buffer",
            gbps(received, stream_secs),
            dropped
        ),
    ));
    rows.push(("file upload, 1 GiB to tmpfs".into(), gbps(FILE_BYTES, upload_secs)));
    rows.push(("file download, 1 GiB from tmpfs".into(), gbps(FILE_BYTES, download_secs)));
    rows.push(("peak RSS after the above".into(), peak_rss));
    println!("| measure | result |\n|---|---|");
    for (measure, result) in rows {
        println!("| {measure} | {result} |");
    }
}
