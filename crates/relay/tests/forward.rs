//! A front server that relays every request to a backend over a fresh TCP
//! connection, exercised with streaming bodies, WebSocket and HTTP/2.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hutch_relay::{Backend, BoxBody, forward};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const DEADLINE: Duration = Duration::from_secs(10);

/// Serves `handler` on a fresh loopback port with HTTP/1.1 and h2c.
async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<BoxBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// The front: relays everything to `backend`.
async fn relay_to(backend: SocketAddr) -> SocketAddr {
    serve(move |req: Request<Incoming>| async move {
        let stream = TcpStream::connect(backend).await.unwrap();
        match forward(stream, Backend::matching(req.version()), req).await {
            Ok(response) => response,
            Err(error) => Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(full(error.to_string()))
                .unwrap(),
        }
    })
    .await
}

fn full(text: impl Into<Bytes>) -> BoxBody {
    Full::new(text.into()).map_err(|never| match never {}).boxed_unsync()
}

/// Echoes the request body back as it arrives, with the path in a header.
async fn echo(req: Request<Incoming>) -> Response<BoxBody> {
    let path = req.uri().path().to_owned();
    let version = format!("{:?}", req.version());
    Response::builder()
        .header("x-path", path)
        .header("x-version", version)
        .body(req.into_body().map_err(Into::into).boxed_unsync())
        .unwrap()
}

#[tokio::test]
async fn bodies_stream_through_without_being_buffered() {
    let front = relay_to(serve(echo).await).await;
    let stream = TcpStream::connect(front).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);

    let (chunks, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let body = StreamBody::new(tokio_stream_from(rx));
    let request = Request::post("/echo/path?q=1").header("host", "front").body(body).unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.headers()["x-path"], "/echo/path");
    let mut body = response.into_body();

    // Each chunk comes back before the next one is sent: nothing waits for the
    // whole body on either leg.
    for round in 0..3 {
        let chunk = Bytes::from(format!("chunk {round}"));
        chunks.send(Ok(Frame::data(chunk.clone()))).await.unwrap();
        let frame = tokio::time::timeout(DEADLINE, body.frame()).await.unwrap().unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), chunk);
    }
    drop(chunks);
    while let Some(frame) = body.frame().await {
        frame.unwrap();
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn websocket_upgrades_are_spliced() {
    // The backend is a plain WebSocket echo server on raw TCP.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        while let Some(Ok(message)) = ws.next().await {
            if message.is_binary() || message.is_text() {
                ws.send(message).await.unwrap();
            }
        }
    });
    let front = relay_to(backend).await;

    let (mut ws, response) = tokio::time::timeout(
        DEADLINE,
        tokio_tungstenite::connect_async(format!("ws://{front}/ws")),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let payload = Bytes::from_static(b"\x00binary\xffframe");
    ws.send(Message::Binary(payload.clone())).await.unwrap();
    let echoed = tokio::time::timeout(DEADLINE, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echoed.into_data(), payload);
}

#[tokio::test]
async fn http2_clients_reach_the_backend_over_http2() {
    let front = relay_to(serve(echo).await).await;
    let stream = TcpStream::connect(front).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = Request::post("http://front/h2").body(full("over h2")).unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.headers()["x-version"], "HTTP/2.0");
    assert_eq!(response.headers()["x-path"], "/h2");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "over h2");
}

#[tokio::test]
async fn a_backend_that_hangs_up_is_an_error_not_a_panic() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            drop(stream);
        }
    });
    let front = relay_to(backend).await;
    let stream = TcpStream::connect(front).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(Request::get("/").body(full("")).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
}
