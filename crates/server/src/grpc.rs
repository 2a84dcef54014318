//! The gRPC `Node` service dataplanes connect to: `Register`, then one
//! `Sync` stream of reports up and desired states down.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use hutch_proto::node::node_server::{Node, NodeServer};
use std::collections::HashSet;

use hutch_proto::node::{
    DesiredSandbox, DesiredState, NodeReport, RegisterRequest, RegisterResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use crate::controller::{Command, ControlError, Handle, NodeDesired};
use crate::keys::constant_time_eq;

/// Optional metadata on `Sync` naming the node, so the server can send the
/// desired state at once instead of in answer to the first report.
pub const NODE_ID_METADATA: &str = "hutch-node-id";

type DesiredWatch = watch::Receiver<Arc<NodeDesired>>;

/// The most bytes of specs one `DesiredState` carries; the rest follow in
/// answer to the node's next report. Far below the 4 MiB tonic decodes by
/// default, so a node of any size and specs of any (bounded) size never break
/// the stream.
pub const SPEC_BUDGET_BYTES: usize = 1 << 20;

/// The largest message either side decodes: a report of thousands of sandboxes,
/// each with a 1 KiB message, fits with room to spare.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// What one stream sent last, so that it never sends the same message twice in
/// a row: the desired state (by pointer) and the ids whose specs went with it.
#[derive(Default)]
struct LastSent {
    state: Option<Arc<NodeDesired>>,
    with_specs: Vec<String>,
}

/// The message for a node that last reported `known`: every sandbox by id, and
/// the specs of those it does not know, up to [`SPEC_BUDGET_BYTES`].
pub fn message(desired: &NodeDesired, known: &HashSet<String>) -> (DesiredState, Vec<String>) {
    use prost::Message as _;
    let mut budget = SPEC_BUDGET_BYTES;
    let mut more = false;
    let mut with_specs = Vec::new();
    let sandboxes = desired
        .sandboxes
        .iter()
        .map(|entry| {
            let mut spec = None;
            if !known.contains(&entry.id) {
                let size = entry.spec.encoded_len();
                // The first spec goes even when it alone is over the budget.
                if size <= budget || with_specs.is_empty() {
                    budget = budget.saturating_sub(size);
                    spec = Some((*entry.spec).clone());
                    with_specs.push(entry.id.clone());
                } else {
                    more = true;
                }
            }
            DesiredSandbox {
                id: entry.id.clone(),
                spec,
                phase: entry.phase as i32,
                grace_secs: entry.grace_secs,
            }
        })
        .collect();
    let state =
        DesiredState { sandboxes, more, blocked_addresses: desired.blocked_addresses.clone() };
    (state, with_specs)
}

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
    InterceptedService::new(
        NodeServer::new(NodeService { controller, shutdown })
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
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
        // What the node reported last: the sandboxes whose specs it has.
        let mut known: HashSet<String> = HashSet::new();
        let mut last = LastSent::default();
        let mut desired = match node_id {
            Some(node_id) => {
                let mut desired = self.connect(node_id).await?;
                let first = desired.borrow_and_update().clone();
                // The channel is empty and its receiver alive: this cannot fail.
                let _ = outbound.try_send(Ok(last.next(&first, &known).unwrap_or_default()));
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
                        known = report.sandboxes.iter().map(|s| s.id.clone()).collect();
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
                            Ok(state) => match last.next(&state, &known) {
                                Some(message) => Ok(message),
                                None => continue,
                            },
                            Err(error) => Err(error),
                        };
                        let failed = answer.is_err();
                        if outbound.send(answer).await.is_err() || failed {
                            break;
                        }
                    }
                    changed = changed(&mut desired) => {
                        let Some(state) = changed else { break };
                        let Some(message) = last.next(&state, &known) else { continue };
                        if outbound.send(Ok(message)).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

impl LastSent {
    /// The message to send for `state`, unless it is the very one sent last.
    fn next(&mut self, state: &Arc<NodeDesired>, known: &HashSet<String>) -> Option<DesiredState> {
        let (message, with_specs) = message(state, known);
        let same_state = self.state.as_ref().is_some_and(|last| Arc::ptr_eq(last, state));
        if same_state && with_specs == self.with_specs {
            return None;
        }
        self.state = Some(state.clone());
        self.with_specs = with_specs;
        Some(message)
    }
}

/// The next desired state once it changes; never resolves before the node
/// is known, `None` once the controller is gone.
async fn changed(desired: &mut Option<DesiredWatch>) -> Option<Arc<NodeDesired>> {
    match desired {
        Some(watch) => {
            watch.changed().await.ok()?;
            Some(watch.borrow_and_update().clone())
        }
        None => std::future::pending().await,
    }
}
