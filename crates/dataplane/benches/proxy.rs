//! Round trips through the dataplane's proxy to a real sandbox's sandboxd,
//! next to the same requests straight to sandboxd's unix socket.
//!
//! `HUTCH_SANDBOXD=<static sandboxd> BENCH_ITERS=500 cargo bench -p hutch-dataplane --bench proxy`

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hutch_proto::node::ObservedPhase;
use hyper_util::rt::TokioIo;
use support::{TOKEN, TestNode, new_id, run, spec};

fn main() -> anyhow::Result<()> {
    let iters: usize =
        std::env::var("BENCH_ITERS").ok().and_then(|n| n.parse().ok()).unwrap_or(300);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(bench(iters))
}

async fn bench(iters: usize) -> anyhow::Result<()> {
    let node = TestNode::start("bench").await?;
    let id = new_id();
    node.server.set_desired(vec![run(spec(&id, &[], &[]))]);
    node.server.wait_phase(&id, ObservedPhase::ObservedRunning).await?;
    let socket = node.dir.path().join("run").join(&id).join("sandboxd/sandboxd.sock");
    let exec = serde_json::json!({ "command": "true" }).to_string();
    let headers = vec![
        ("hutch-sandbox-id", id.clone()),
        ("hutch-sandbox-port", "9501".to_owned()),
        ("hutch-node-token", TOKEN.to_owned()),
    ];

    println!("dataplane proxy, {iters} iterations each (p50 / p99):");
    let proxy = node.proxy();
    report(
        "GET /health, direct unix socket, new connection",
        measure(iters, || unix(&socket, "GET", "/health", String::new())).await?,
    );
    report(
        "GET /health via proxy, new connection",
        measure(iters, || async {
            support::request(proxy, "GET", "/health", &headers, None).await.map(drop)
        })
        .await?,
    );
    let mut kept = KeepAlive::connect(proxy).await?;
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        kept.get("/health", &headers).await?;
        samples.push(start.elapsed());
    }
    report("GET /health via proxy, kept-alive connection", samples);
    report(
        "POST /exec true, direct unix socket",
        measure(iters, || unix(&socket, "POST", "/exec", exec.clone())).await?,
    );
    report(
        "POST /exec true via proxy, new connection",
        measure(iters, || async {
            support::request(proxy, "POST", "/exec", &headers, Some(exec.clone())).await.map(drop)
        })
        .await?,
    );
    Ok(())
}

async fn measure<F, Fut>(iters: usize, mut op: F) -> anyhow::Result<Vec<Duration>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    // Warm-up: connection setup paths, page cache, sandboxd's allocator.
    for _ in 0..10 {
        op().await?;
    }
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        op().await?;
        samples.push(start.elapsed());
    }
    Ok(samples)
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("  {name:<48} {:>7.3} ms / {:>7.3} ms", ms(at(0.5)), ms(at(0.99)));
}

async fn unix(socket: &Path, method: &str, path: &str, body: String) -> anyhow::Result<()> {
    let (status, _) = hutch_testkit::sandboxd_request(socket, method, path, Some(body)).await?;
    anyhow::ensure!((200..300).contains(&status), "{status}");
    Ok(())
}

struct KeepAlive {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl KeepAlive {
    async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Self { sender })
    }

    async fn get(&mut self, path: &str, headers: &[(&str, String)]) -> anyhow::Result<()> {
        let mut builder = hyper::Request::builder().uri(path).header("host", "proxy");
        for (name, value) in headers {
            builder = builder.header(*name, value);
        }
        self.sender.ready().await?;
        let response = self.sender.send_request(builder.body(Full::new(Bytes::new()))?).await?;
        anyhow::ensure!(response.status().is_success(), "{}", response.status());
        response.into_body().collect().await?;
        Ok(())
    }
}
