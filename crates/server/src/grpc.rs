//! The gRPC `Node` service dataplanes connect to: `Register`, then one
//! `Sync` stream of reports up and desired states down.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use hutch_proto::node::node_server::{Node, NodeServer};
use hutch_proto::node::{DesiredState, NodeReport, RegisterRequest, RegisterResponse};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use crate::controller::{Command, ControlError, Handle};
use crate::keys::constant_time_eq;

/// Optional metadata on `Sync` naming the node, so the server can send the
/// desired state at once instead of in answer to the first report.
pub const NODE_ID_METADATA: &str = "hutch-node-id";

type DesiredWatch = watch::Receiver<Arc<DesiredState>>;

#[derive(Debug, Clone)]
pub struct NodeService {
    controller: Handle,
    shutdown: CancellationToken,
}

/// Checks `authorization: Bearer <node token>` on every call.
#[derive(Clone, Debug)]
pub struct NodeTokenCheck {
    expected: std::sync::Arc<str>,
}

impl tonic::service::Interceptor for NodeTokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim);
        match token {
            Some(token) if constant_time_eq(token.as_bytes(), self.expected.as_bytes()) => {
                Ok(request)
            }
            _ => Err(Status::unauthenticated("missing or wrong node token")),
        }
    }
}

pub fn service(
    controller: Handle,
    node_token: std::sync::Arc<str>,
    shutdown: CancellationToken,
) -> InterceptedService<NodeServer<NodeService>, NodeTokenCheck> {
    NodeServer::with_interceptor(
        NodeService { controller, shutdown },
        NodeTokenCheck { expected: node_token },
    )
}

fn status(error: ControlError) -> Status {
    match error {
        ControlError::NodeNotRegistered(_) => Status::failed_precondition(error.to_string()),
        ControlError::ShuttingDown => Status::unavailable(error.to_string()),
        error => {
            tracing::error!(error = %crate::controller::error_chain(&error), "node call failed");
            Status::internal("internal error")
        }
    }
}

impl NodeService {
    async fn connect(&self, node_id: String) -> Result<DesiredWatch, Status> {
        self.controller
            .call(|reply| Command::Connect { node_id, reply })
            .await
            .map_err(status)?
            .map_err(status)
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let request = request.into_inner();
        if request.node_id.is_empty() || request.node_id.len() > 253 {
            return Err(Status::invalid_argument("node_id must be 1 to 253 characters"));
        }
        if request.proxy_url.is_empty() {
            return Err(Status::invalid_argument("proxy_url is required"));
        }
        let response = self
            .controller
            .call(|reply| Command::Register { request, reply })
            .await
            .map_err(status)?;
        Ok(Response::new(response))
    }

    type SyncStream = Pin<Box<dyn Stream<Item = Result<DesiredState, Status>> + Send + 'static>>;

    async fn sync(
        &self,
        request: Request<Streaming<NodeReport>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let node_id = request
            .metadata()
            .get(NODE_ID_METADATA)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let mut inbound = request.into_inner();
        let (outbound, receiver) = mpsc::channel(4);
        // The state this stream last carried: an unchanged one is not sent
        // again (the stream loses nothing, and each is the node's whole table).
        let mut last_sent: Option<Arc<DesiredState>> = None;
        let mut desired = match node_id {
            Some(node_id) => {
                let mut desired = self.connect(node_id).await?;
                let first = desired.borrow_and_update().clone();
                // The channel is empty and its receiver alive: this cannot fail.
                let _ = outbound.try_send(Ok((*first).clone()));
                last_sent = Some(first);
                Some(desired)
            }
            None => None,
        };
        let service = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = service.shutdown.cancelled() => break,
                    message = inbound.message() => {
                        let report = match message {
                            Ok(Some(report)) => report,
                            Ok(None) => break,
                            Err(error) => {
                                tracing::debug!(%error, "sync stream ended");
                                break;
                            }
                        };
                        if desired.is_none() {
                            match service.connect(report.node_id.clone()).await {
                                Ok(watch) => desired = Some(watch),
                                Err(error) => {
                                    let _ = outbound.send(Err(error)).await;
                                    break;
                                }
                            }
                        }
                        let answer = service
                            .controller
                            .call(|reply| Command::Report { report, reply })
                            .await
                            .map_err(status)
                            .and_then(|result| result.map_err(status));
                        // The watch is left unmarked on purpose: a state the
                        // controller published after computing this answer
                        // must still go out, and a repeat is harmless.
                        let answer = match answer {
                            Ok(state) if is_last_sent(&last_sent, &state) => continue,
                            Ok(state) => Ok(state),
                            Err(error) => Err(error),
                        };
                        let failed = answer.is_err();
                        if let Ok(state) = &answer {
                            last_sent = Some(state.clone());
                        }
                        if outbound.send(answer.map(|state| (*state).clone())).await.is_err() || failed {
                            break;
                        }
                    }
                    changed = changed(&mut desired) => {
                        let Some(state) = changed else { break };
                        if is_last_sent(&last_sent, &state) {
                            continue;
                        }
                        last_sent = Some(state.clone());
                        if outbound.send(Ok((*state).clone())).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

/// The next desired state once it changes; never resolves before the node
/// is known, `None` once the controller is gone.
async fn changed(desired: &mut Option<DesiredWatch>) -> Option<Arc<DesiredState>> {
    match desired {
        Some(watch) => {
            watch.changed().await.ok()?;
            Some(watch.borrow_and_update().clone())
        }
        None => std::future::pending().await,
    }
}

/// Whether `state` is the very state this stream sent last. The controller
/// publishes a new `Arc` for every change, so pointer equality is enough.
fn is_last_sent(last_sent: &Option<Arc<DesiredState>>, state: &Arc<DesiredState>) -> bool {
    last_sent.as_ref().is_some_and(|last| Arc::ptr_eq(last, state))
}
