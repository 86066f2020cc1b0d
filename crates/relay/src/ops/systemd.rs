//! Talking to systemd under `Type=notify`: readiness, a one-line status, reload and stop markers,
//! and the watchdog. Every call is a no-op when the process was not started with `NOTIFY_SOCKET`
//! (a shell, the tests, the demo), so callers never need to ask.
//!
//! A failed send is logged once and otherwise ignored: systemd going away must not take the relay
//! with it.

use crate::ctx::{ChannelState, Registration};
use sd_notify::NotifyState;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static SEND_FAILED: AtomicBool = AtomicBool::new(false);

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states)
        && !SEND_FAILED.swap(true, Ordering::Relaxed)
    {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET); later failures are not logged");
    }
}

/// The store is open and every listener is bound: systemd may start what depends on us.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A one-line state for `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// A reload starts; [`ready`] ends it. The monotonic timestamp lets `Type=notify-reload` match it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading configuration"),
        ]),
        Err(_) => send(&[
            NotifyState::Reloading,
            NotifyState::Status("reloading configuration"),
        ]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to pet the watchdog: half of `WATCHDOG_USEC`, or None when systemd set no watchdog
/// (or set it for another process).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// The state an admin sees in `systemctl status ucrelay`: registration, then the channel.
pub fn summary(ctx: &super::Running) -> String {
    let st = ctx.status.snapshot();
    let cloud = match &st.registration {
        Registration::Starting => return "registering with the cloud".into(),
        Registration::Rejected(why) => return format!("PIN rejected by cloud: {why}"),
        Registration::Failed(why) => return format!("not registered: {why}"),
        Registration::Registered => match &st.channel {
            ChannelState::Connected => "registered, command channel connected".to_string(),
            ChannelState::WaitingForRegistration | ChannelState::Connecting => {
                "registered, command channel connecting".to_string()
            }
            ChannelState::Disconnected(why) => {
                format!("registered, command channel down: {why}")
            }
        },
    };
    match &ctx.edge {
        Some(e) => {
            let addr = e.bound.get().map(|b| b.0).unwrap_or(e.cfg().listen);
            format!("{cloud}; edge on {addr}")
        }
        None => cloud,
    }
}
