//! The cloud side of the command channel (`GET /relay/v1/channel`, WebSocket): authenticates
//! before upgrading, sends `hello` then the relay's undelivered commands, pushes new commands,
//! reads acks and error reports, and answers pings.
//!
//! One channel per relay: a new connection closes the older one. The test API can freeze a
//! connection (no more reads or writes, socket kept open) to play a half-open peer. It does not
//! ping the relay itself: keepalive is the relay's job.
//!
//! A relay whose queue is full answers a command with an `error` of code `busy`: the command goes
//! back to the queue, and the relay's commands wait (new ones too) for [`BUSY_BASE`], then go out
//! again, oldest first. A retry the relay answers with busy only (it acknowledged none of them, so
//! it made no progress) doubles the next wait, up to [`BUSY_CAP`]; a retry in which it took some
//! commands keeps the wait short.

use super::api::{ApiError, bearer_relay};
use super::state::CommandState;
use super::{Runtime, Shared};
use crate::protocol::{ChannelErrorCode, CloudMessage, Command, RelayMessage};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt as _, StreamExt as _};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tracing::{info, warn};

/// Largest frame or message accepted from a relay: acks and error reports are small.
const MAX_INBOUND: usize = 1 << 20;

/// How long a close frame may take to go out before the socket is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// First wait after a relay answered busy.
pub const BUSY_BASE: Duration = Duration::from_millis(250);
/// Longest wait between retries to a busy relay.
pub const BUSY_CAP: Duration = Duration::from_secs(10);

/// The backoff towards one relay that answered busy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BusyBackoff {
    /// Commands wait until then.
    pub until: Instant,
    pub step: Duration,
    /// The relay acknowledged a command since this wait began: it is making progress.
    pub acked: bool,
}

impl BusyBackoff {
    pub fn waiting(&self, now: Instant) -> bool {
        now < self.until
    }
}

/// A frame waiting to be written, with an optional notice once it is on the socket.
pub(crate) struct Outgoing {
    pub text: String,
    pub written: Option<oneshot::Sender<()>>,
}

/// The open channel of one relay, as kept in [`Runtime::channels`].
pub(crate) struct ChannelConn {
    pub conn_id: u64,
    pub session_id: String,
    pub tx: mpsc::UnboundedSender<Outgoing>,
    /// Cancelled when a newer connection replaces this one (and, as a child token, at shutdown).
    pub close: tokio_util::sync::CancellationToken,
    /// Cancelled by `POST /sim/channel/freeze`.
    pub freeze: tokio_util::sync::CancellationToken,
}

impl ChannelConn {
    pub fn is_frozen(&self) -> bool {
        self.freeze.is_cancelled()
    }
}

/// An `error` message a relay sent on its channel, as listed by `GET /sim/channel/errors`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ChannelErrorEntry {
    pub relay_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub code: ChannelErrorCode,
    pub message: String,
}

impl Runtime {
    /// Pushes command `idx` down its relay's channel when one is up and not frozen, marking it
    /// sent; otherwise it stays where it is and goes out at the next connection.
    pub fn deliver_command(&mut self, idx: usize) {
        let Some(cmd) = self.db.p.commands.get_mut(idx) else {
            return;
        };
        // A relay that answered busy gets nothing until its backoff is over.
        if self
            .busy
            .get(&cmd.relay_id)
            .is_some_and(|b| b.waiting(Instant::now()))
        {
            return;
        }
        let Some(conn) = self.channels.get(&cmd.relay_id) else {
            return;
        };
        if conn.is_frozen() {
            return;
        }
        let msg = CloudMessage::Command(Command {
            id: cmd.id.clone(),
            name: cmd.name.clone(),
            params: cmd.params.clone(),
        });
        let Ok(text) = serde_json::to_string(&msg) else {
            return;
        };
        if conn
            .tx
            .send(Outgoing {
                text,
                written: None,
            })
            .is_ok()
        {
            cmd.advance(CommandState::Sent);
        }
    }
}

/// `GET /relay/v1/channel`: token check and WebSocket handshake, answered as plain HTTP when
/// either fails; the connection itself runs in its own task.
pub(crate) async fn upgrade(State(shared): State<Arc<Shared>>, mut req: Request) -> Response {
    let relay_id = match bearer_relay(&shared, req.headers()) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let key = match check_handshake(req.headers()) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let task_shared = shared.clone();
    shared.tracker.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => run(task_shared, relay_id, TokioIo::new(upgraded)).await,
            Err(e) => warn!(%relay_id, error = %e, "channel upgrade failed"),
        }
    });
    let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(v) = HeaderValue::from_str(&key) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

/// Checks the client's upgrade request (RFC 6455 section 4.2.1); returns the accept key.
fn check_handshake(headers: &HeaderMap) -> Result<String, ApiError> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return Err(ApiError::bad_request(
            "this endpoint needs a WebSocket upgrade (Upgrade: websocket)",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        != Some("13")
    {
        return Err(ApiError::bad_request(
            "unsupported WebSocket version: Sec-WebSocket-Version must be 13",
        ));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|v| v.as_bytes().trim_ascii())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ApiError::bad_request("missing Sec-WebSocket-Key"))?;
    Ok(derive_accept_key(key))
}

async fn run<S>(shared: Arc<Shared>, relay_id: String, io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_INBOUND))
        .max_frame_size(Some(MAX_INBOUND));
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let close = shared.cancel.child_token();
    let freeze = tokio_util::sync::CancellationToken::new();

    // Registering the connection, queueing hello and the backlog happen under one lock, so a
    // command created meanwhile is either in the backlog or pushed after it, never lost or doubled.
    let (conn_id, session_id, backlog) = {
        let mut rt = shared.lock();
        if shared.cancel.is_cancelled() {
            return;
        }
        let conn_id = rt.next_conn_id;
        rt.next_conn_id += 1;
        let session_id = uuid::Uuid::new_v4().to_string();
        let conn = ChannelConn {
            conn_id,
            session_id: session_id.clone(),
            tx: tx.clone(),
            close: close.clone(),
            freeze: freeze.clone(),
        };
        rt.channel_down.remove(&relay_id);
        if let Some(old) = rt.channels.insert(relay_id.clone(), conn) {
            info!(%relay_id, old_session = %old.session_id, "channel replaced by a newer connection");
            old.close.cancel();
        }
        rt.db.p.stats.channel_connections += 1;
        if let Some(relay) = rt.db.p.relays.get_mut(&relay_id) {
            relay.channel_connections += 1;
        }
        rt.changed();
        let hello = CloudMessage::Hello {
            relay_id: relay_id.clone(),
            session_id: session_id.clone(),
            leases: Some(rt.leases_of(&relay_id)),
        };
        if let Ok(text) = serde_json::to_string(&hello) {
            let _ = tx.send(Outgoing {
                text,
                written: None,
            });
        }
        let backlog = rt.db.undelivered_commands(&relay_id);
        for &idx in &backlog {
            rt.deliver_command(idx);
        }
        (conn_id, session_id, backlog.len())
    };
    // The map holds the only long-lived sender: when this connection is replaced, `rx` ends.
    drop(tx);
    info!(%relay_id, %session_id, backlog, "channel connected");

    let reason = loop {
        tokio::select! {
            biased;
            _ = close.cancelled() => {
                let (code, why) = if shared.cancel.is_cancelled() {
                    (CloseCode::Away, "cloud shutting down")
                } else {
                    (CloseCode::Normal, "replaced by a newer connection")
                };
                let frame = CloseFrame { code, reason: why.into() };
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(Some(frame))).await;
                break why;
            }
            _ = freeze.cancelled() => {
                info!(%relay_id, %session_id, "channel frozen by the test API");
                // Half-open peer: neither read nor write, keep the socket until replaced or shutdown.
                close.cancelled().await;
                break "frozen connection closed";
            }
            out = rx.recv() => {
                let Some(out) = out else { break "replaced by a newer connection" };
                let sent = tokio::select! {
                    r = ws.send(Message::text(out.text)) => r.is_ok(),
                    _ = close.cancelled() => false,
                };
                if !sent {
                    break "write failed";
                }
                if let Some(done) = out.written {
                    let _ = done.send(());
                }
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => handle_text(&shared, &relay_id, text.as_str()),
                Some(Ok(Message::Ping(_))) => {
                    // tungstenite queued the pong while reading; push it out now rather than at
                    // the next read or write.
                    let flushed = tokio::select! {
                        r = ws.flush() => r.is_ok(),
                        _ = close.cancelled() => false,
                    };
                    if !flushed {
                        break "write failed";
                    }
                }
                Some(Ok(Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Binary(b))) => {
                    warn!(%relay_id, len = b.len(), "channel: binary frame from relay ignored");
                    shared.lock().db.p.stats.channel_bad_frames += 1;
                }
                // The close reply is queued by tungstenite and sent by the next read.
                Some(Ok(Message::Close(_))) => {}
                Some(Err(e)) => {
                    info!(%relay_id, error = %e, "channel read failed");
                    break "read failed";
                }
                None => break "closed by the relay",
            }
        }
    };

    {
        let mut rt = shared.lock();
        if rt
            .channels
            .get(&relay_id)
            .is_some_and(|c| c.conn_id == conn_id)
        {
            rt.channels.remove(&relay_id);
            let now = shared.now();
            rt.channel_down.insert(relay_id.clone(), now);
        }
    }
    info!(%relay_id, %session_id, reason, "channel disconnected");
}

fn handle_text(shared: &Arc<Shared>, relay_id: &str, text: &str) {
    let msg = match serde_json::from_str::<RelayMessage>(text) {
        Ok(m) => m,
        Err(e) => {
            warn!(%relay_id, len = text.len(), error = %e, "channel: unparseable frame from relay");
            let mut rt = shared.lock();
            rt.db.p.stats.channel_bad_frames += 1;
            rt.changed();
            return;
        }
    };
    let mut rt = shared.lock();
    match msg {
        RelayMessage::Ack { id } => match rt.db.command_mut(&id) {
            Some(cmd) if cmd.relay_id == relay_id => {
                cmd.advance(CommandState::Acked);
                if let Some(b) = rt.busy.get_mut(relay_id) {
                    b.acked = true;
                }
                rt.changed();
            }
            _ => {
                warn!(%relay_id, command_id = %id, "channel: ack for a command this relay was not sent")
            }
        },
        RelayMessage::Error {
            id: Some(id),
            code: ChannelErrorCode::Busy,
            message,
        } => {
            let requeued = rt.db.requeue(&id, relay_id);
            rt.db.p.stats.busy_answers += 1;
            rt.changed();
            info!(%relay_id, command_id = %id, requeued, %message, "channel: relay busy; backing off");
            rt.channel_errors.push(ChannelErrorEntry {
                relay_id: relay_id.to_owned(),
                id: Some(id),
                code: ChannelErrorCode::Busy,
                message,
            });
            back_off(shared, &mut rt, relay_id);
        }
        RelayMessage::Error { id, code, message } => {
            warn!(%relay_id, command_id = ?id, code = ?code, %message, "channel: relay reported an error");
            rt.channel_errors.push(ChannelErrorEntry {
                relay_id: relay_id.to_owned(),
                id,
                code,
                message,
            });
        }
    }
}

/// A relay answered busy: unless it is already waiting (this answer belongs to the burst that
/// started the wait), its commands wait a backoff step, doubled from the last one when the relay
/// took none of the commands sent since that wait began; then the waiting commands go out again.
fn back_off(shared: &Arc<Shared>, rt: &mut super::Runtime, relay_id: &str) {
    let now = Instant::now();
    let step = match rt.busy.get(relay_id) {
        Some(b) if b.waiting(now) => return,
        Some(b) if !b.acked => (b.step * 2).min(BUSY_CAP),
        _ => BUSY_BASE,
    };
    rt.busy.insert(
        relay_id.to_owned(),
        BusyBackoff {
            until: now + step,
            step,
            acked: false,
        },
    );
    let shared2 = shared.clone();
    let relay = relay_id.to_owned();
    shared.tracker.spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(step) => {}
            _ = shared2.cancel.cancelled() => return,
        }
        let mut rt = shared2.lock();
        let queued = rt.db.queued_commands(&relay);
        for idx in &queued {
            rt.deliver_command(*idx);
        }
        if !queued.is_empty() {
            rt.changed();
            info!(%relay, commands = queued.len(), "busy backoff over; commands sent again");
        }
    });
}
