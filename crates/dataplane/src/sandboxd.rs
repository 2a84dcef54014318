//! The few sandboxd calls the dataplane makes itself, over the sandbox's unix socket.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hutch_api::ProcessInfo;
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SandboxdCallError {
    #[error("connect to sandboxd")]
    Connect(#[from] hutch_isolate::ConnectSandboxdError),
    #[error("http exchange with sandboxd")]
    Http(#[from] hyper::Error),
    #[error("build request")]
    Request(#[from] http::Error),
    #[error("sandboxd answered {status}: {body}")]
    Status { status: http::StatusCode, body: String },
    #[error("parse sandboxd's answer")]
    Parse(#[from] serde_json::Error),
}

/// `GET /processes/{tag}/wait` with no timeout: returns once the process exited
/// (or the connection broke, because sandboxd died).
pub(crate) async fn wait_process(
    driver: &hutch_isolate::Driver,
    id: &hutch_isolate::SandboxId,
    tag: &str,
) -> Result<ProcessInfo, SandboxdCallError> {
    let stream = driver.connect_sandboxd(id).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = http::Request::get(format!("/processes/{tag}/wait"))
        .header(http::header::HOST, "sandboxd")
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(SandboxdCallError::Status {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    Ok(serde_json::from_slice(&body)?)
}
