//! Bearer-token auth, the Docker Hub way: the registry answers 401 with a
//! `Bearer realm=...` challenge, the client trades basic credentials for a
//! token at the realm, then sends `Authorization: Bearer <token>`.
//!
//! Debian's docker-registry can only do token auth with a JWT-issuing token
//! server and certificates, so the test puts a small token-checking HTTP
//! front (a real server on loopback, speaking the token protocol) before a
//! real registry that holds the image.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Result;
use common::{busybox_layer, push};
use hutch_image::{ImageStore, PullFailure, PullOptions, RegistryAuth};
use hutch_testkit::Registry;
use oci_client::secrets::RegistryAuth as OciAuth;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "hutch-test-token";
/// base64("alice:s3cret")
const BASIC: &str = "Basic YWxpY2U6czNjcmV0";

struct TokenFront {
    addr: String,
    tokens_issued: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TokenFront {
    async fn start(upstream: String) -> Result<TokenFront> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let tokens_issued = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let addr = addr.clone();
            let tokens_issued = Arc::clone(&tokens_issued);
            async move {
                while let Ok((socket, _)) = listener.accept().await {
                    let addr = addr.clone();
                    let upstream = upstream.clone();
                    let tokens_issued = Arc::clone(&tokens_issued);
                    tokio::spawn(async move {
                        let _ = handle(socket, &addr, &upstream, &tokens_issued).await;
                    });
                }
            }
        });
        Ok(TokenFront { addr, tokens_issued, task })
    }
}

async fn read_head(socket: &mut TcpStream) -> Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if socket.read(&mut byte).await? == 0 {
            anyhow::bail!("connection closed mid-request");
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

async fn respond(socket: &mut TcpStream, status: &str, extra: &str, body: &str) -> Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(response.as_bytes()).await?;
    socket.shutdown().await?;
    Ok(())
}

/// One request per connection: the token endpoint, a 401 challenge, or a
/// forward to the registry.
async fn handle(
    mut socket: TcpStream,
    addr: &str,
    upstream: &str,
    issued: &AtomicUsize,
) -> Result<()> {
    let head = read_head(&mut socket).await?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let path = request_line.split(' ').nth(1).unwrap_or_default().to_owned();
    let headers: Vec<&str> = lines.filter(|l| !l.is_empty()).collect();
    let authorization = headers
        .iter()
        .find_map(|h| h.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("authorization")))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();

    if path.starts_with("/token") {
        if authorization == BASIC {
            issued.fetch_add(1, Ordering::SeqCst);
            let body = format!(r#"{{"token":"{TOKEN}","expires_in":300}}"#);
            return respond(&mut socket, "200 OK", "", &body).await;
        }
        return respond(&mut socket, "401 Unauthorized", "", r#"{"details":"bad credentials"}"#)
            .await;
    }
    if authorization != format!("Bearer {TOKEN}") {
        let challenge = format!(
            "WWW-Authenticate: Bearer realm=\"http://{addr}/token\",service=\"hutch-test\"\r\n"
        );
        let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required","detail":null}]}"#;
        return respond(&mut socket, "401 Unauthorized", &challenge, body).await;
    }
    let mut forwarded = format!("{request_line}\r\nHost: {upstream}\r\nConnection: close\r\n");
    for header in headers {
        let name = header.split(':').next().unwrap_or_default();
        if !["host", "connection", "authorization"].iter().any(|n| name.eq_ignore_ascii_case(n)) {
            forwarded.push_str(header);
            forwarded.push_str("\r\n");
        }
    }
    forwarded.push_str("\r\n");
    let mut registry = TcpStream::connect(upstream).await?;
    registry.write_all(forwarded.as_bytes()).await?;
    tokio::io::copy(&mut registry, &mut socket).await?;
    socket.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_dance_with_basic_credentials_and_a_direct_token() -> Result<()> {
    let registry = Registry::start()?;
    push(&registry, "test/busybox:1", &[busybox_layer().tar()], &OciAuth::Anonymous).await?;
    let front = TokenFront::start(registry.addr.clone()).await?;
    let reference = format!("{}/test/busybox:1", front.addr);
    let options =
        PullOptions { insecure_registries: vec![front.addr.clone()], ..PullOptions::default() };

    let root = tempfile::tempdir()?;
    let store = ImageStore::open(root.path().to_owned())?;

    // No credentials, wrong credentials, a wrong token: all unauthorized.
    let denied = [
        RegistryAuth::Anonymous,
        RegistryAuth::Basic { username: "alice".into(), password: "nope".into() },
        RegistryAuth::Bearer { token: "forged".into() },
    ];
    for auth in denied {
        let err = store
            .pull(&reference, auth.clone(), options.clone(), None)
            .await
            .expect_err("must be refused");
        assert!(matches!(err.failure(), PullFailure::Unauthorized(_)), "{auth:?}: {err:?}");
    }
    assert_eq!(front.tokens_issued.load(Ordering::SeqCst), 0);

    // Basic credentials are exchanged for a token at the realm.
    let image = store
        .pull(
            &reference,
            RegistryAuth::Basic { username: "alice".into(), password: "s3cret".into() },
            options.clone(),
            None,
        )
        .await?;
    assert!(front.tokens_issued.load(Ordering::SeqCst) >= 1);
    assert!(image.layers[0].join("bin/busybox").is_file());

    // A ready token works directly, without the token endpoint.
    store.remove(&image.reference).await?;
    let issued = front.tokens_issued.load(Ordering::SeqCst);
    let again = store
        .pull(&reference, RegistryAuth::Bearer { token: TOKEN.into() }, options.clone(), None)
        .await?;
    assert_eq!(again.digest, image.digest);
    assert_eq!(front.tokens_issued.load(Ordering::SeqCst), issued);
    Ok(())
}
