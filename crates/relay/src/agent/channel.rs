//! The command channel: a WebSocket to the cloud, kept up for as long as the relay is registered.
//!
//! Liveness is checked at the protocol level: a Ping every `ping_interval`, and any frame from the
//! cloud counts as life. Three intervals of silence mean the peer is gone even if the socket still
//! looks open (a half-open connection), so the channel is dropped and dialled again. Every write has
//! a deadline too. Reconnects use capped exponential backoff with full jitter, reset after the
//! connection stayed up for a stable period.

use super::Dispatch;
use super::commands::Runner;
use crate::cloud::Sessions;
use crate::ctx::{ChannelState, Ctx};
use crate::protocol::{ChannelErrorCode, CloudMessage, ErrorCode, PATH_CHANNEL, RelayMessage};
use crate::util::backoff::{Backoff, sleep_or_shutdown};
use anyhow::Result;
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long a connection must stay up before the backoff starts again from its base.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// Missed ping intervals after which the peer is considered dead.
const MISSED_PINGS: u32 = 3;

pub async fn run(
    ctx: Ctx,
    sessions: Arc<Sessions>,
    runner: &Runner,
    dispatch: &dyn Dispatch,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut backoff = Backoff::new(Duration::from_secs(1), ctx.config.cloud.reconnect_max);
    let mut rx = sessions.subscribe();
    let mut attempts = 0u64;
    loop {
        // No channel without a registration.
        let session = loop {
            if let Some(s) = rx.borrow_and_update().clone() {
                break s;
            }
            ctx.status.lock().channel = ChannelState::WaitingForRegistration;
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return Ok(()) },
                _ = shutdown.cancelled() => return Ok(()),
            }
        };
        attempts += 1;
        if attempts > 1 {
            ctx.status.lock().reconnects += 1;
        }
        ctx.status.lock().channel = ChannelState::Connecting;
        let reason = match ctx.cloud.websocket(PATH_CHANNEL, &session.token).await {
            Err(e) => {
                if e.code() == Some(ErrorCode::TokenInvalid) {
                    sessions.invalidate(session.generation);
                }
                format!("cannot open channel: {e}")
            }
            Ok(ws) => {
                let since = Instant::now();
                {
                    let mut st = ctx.status.lock();
                    st.channel = ChannelState::Connected;
                    st.channel_since = Some(SystemTime::now());
                }
                info!("command channel connected");
                let reason = serve(&ctx, ws, runner, dispatch, &shutdown).await;
                if shutdown.is_cancelled() {
                    ctx.status.lock().channel =
                        ChannelState::Disconnected("relay shutting down".into());
                    return Ok(());
                }
                if since.elapsed() >= STABLE_AFTER {
                    backoff.reset();
                }
                reason
            }
        };
        let delay = backoff.next_delay();
        warn!(reason = %reason, retry_in = ?delay, "command channel down");
        {
            let mut st = ctx.status.lock();
            st.channel = ChannelState::Disconnected(reason);
            st.channel_since = Some(SystemTime::now());
        }
        if !sleep_or_shutdown(delay, &shutdown).await {
            return Ok(());
        }
    }
}

/// Runs one connected channel; returns why it ended.
async fn serve(
    ctx: &Ctx,
    ws: tokio_tungstenite::WebSocketStream<crate::cloud::BoxIo>,
    runner: &Runner,
    dispatch: &dyn Dispatch,
    shutdown: &CancellationToken,
) -> String {
    let ping_every = ctx.config.cloud.ping_interval;
    let dead_after = ping_every * MISSED_PINGS;
    let (mut sink, mut stream) = ws.split();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_rx = Instant::now();
    // Fires exactly `dead_after` after the last frame: checking on the ping ticks instead would
    // notice up to one more interval late.
    let dead = tokio::time::sleep(dead_after);
    tokio::pin!(dead);

    macro_rules! send {
        ($msg:expr) => {
            match tokio::time::timeout(ping_every.max(Duration::from_secs(1)), sink.send($msg))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return format!("write failed: {e}"),
                Err(_) => return "write timed out (cloud not reading)".to_string(),
            }
        };
    }

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(None))).await;
                return "relay shutting down".into();
            }
            _ = &mut dead => {
                let silent = last_rx.elapsed();
                return format!(
                    "no frame from cloud for {} ({} pings unanswered): connection presumed dead",
                    humantime::format_duration(Duration::from_millis(silent.as_millis() as u64)),
                    MISSED_PINGS
                );
            }
            _ = tick.tick() => {
                if runner.take_refused_if_recovered(ctx) {
                    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(None))).await;
                    return "the store takes writes again: reconnecting so the cloud sends the commands refused meanwhile".into();
                }
                send!(Message::Ping(Vec::new().into()));
            }
            frame = stream.next() => {
                let msg = match frame {
                    None => return "cloud closed the connection".into(),
                    Some(Err(e)) => return format!("channel error: {e}"),
                    Some(Ok(m)) => m,
                };
                last_rx = Instant::now();
                dead.as_mut().reset(tokio::time::Instant::from_std(last_rx + dead_after));
                match msg {
                    Message::Text(text) => {
                        if let Some(reply) = on_text(ctx, runner, dispatch, text.as_str()).await {
                            if matches!(reply, RelayMessage::Error { .. }) {
                                ctx.status.lock().channel_errors_sent += 1;
                            }
                            if let Ok(text) = serde_json::to_string(&reply) {
                                send!(Message::Text(text.into()));
                            }
                        }
                    }
                    Message::Binary(_) => {
                        warn!("cloud sent a binary frame; not part of the protocol");
                        let reply = RelayMessage::Error {
                            id: None,
                            code: ChannelErrorCode::UnsupportedFrame,
                            message: "binary frames are not part of protocol v1".into(),
                        };
                        if let Ok(text) = serde_json::to_string(&reply) {
                            send!(Message::Text(text.into()));
                        }
                    }
                    Message::Close(frame) => {
                        return match frame {
                            Some(f) => format!("cloud closed the channel ({}: {})", f.code, f.reason),
                            None => "cloud closed the channel".into(),
                        };
                    }
                    // Pongs only prove life; tungstenite answers pings itself.
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                }
            }
        }
    }
}

/// Handles one text frame; returns the reply to send at once, if any.
async fn on_text(
    ctx: &Ctx,
    runner: &Runner,
    dispatch: &dyn Dispatch,
    text: &str,
) -> Option<RelayMessage> {
    match CloudMessage::decode(text) {
        Err(e) => {
            warn!(code = ?e.code, error = %e.message, "unusable message on the command channel");
            Some(RelayMessage::Error {
                id: e.id,
                code: e.code,
                message: e.message,
            })
        }
        Ok(CloudMessage::Hello {
            session_id, leases, ..
        }) => {
            debug!(%session_id, "channel session confirmed");
            ctx.status.lock().session_id = Some(session_id);
            // Every task stored so far came on an earlier frame: the list is authoritative.
            if let Some(leases) = leases {
                dispatch.leases(&leases, std::time::Instant::now());
            }
            None
        }
        Ok(CloudMessage::ImagesSync { revision }) => {
            dispatch.images_revision(revision, true);
            None
        }
        Ok(CloudMessage::Command(cmd)) => runner.accept(ctx, cmd).await,
    }
}
