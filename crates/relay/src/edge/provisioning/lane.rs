//! Connections to the provisioning upstream.
//!
//! A device connection gets its own upstream connection (a *lane*) and keeps it for the requests
//! that follow, and that upstream connection is driven by the device connection's own task: while
//! waiting for the answer's head (`exchange`) and while the answer's body streams to the device
//! (`LaneBody`). A request then costs no hand-off to another task and back, which on a loaded
//! 2-core appliance is the difference between idle cores and a full pipe.
//!
//! When a device connection ends, its idle lane is not thrown away: it gets a small task of its
//! own and waits in the upstream's pool, so the next device connection skips the TCP (and TLS)
//! handshake with the upstream. A pooled connection stays usable until the upstream closes it or
//! it has been idle for [`IDLE`]; the pool keeps at most [`POOL_MAX`].

use super::tee::UpBody;
use crate::edge::conn::DeviceConn;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{Builder, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// How long an upstream connection may sit unused in the pool.
pub const IDLE: Duration = Duration::from_secs(60);
/// Idle upstream connections kept for new device connections.
pub const POOL_MAX: usize = 256;

type Sender = SendRequest<UpBody>;
type Conn = Pin<Box<Connection<TokioIo<UpIo>, UpBody>>>;

/// A connection to the upstream, plain or TLS. `Sync` because the answer's body, which drives the
/// connection, travels in a `Sync` box.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync> Io for T {}
pub type UpIo = Box<dyn Io>;

/// An upstream connection in use by one device connection.
pub enum Lane {
    /// Driven by the device connection's task.
    Own { send: Sender, conn: Conn },
    /// Driven by a task of its own (a connection taken from the pool).
    Shared { send: Sender },
}

/// Why a request got no answer.
pub enum SendError {
    /// The request was not sent (the connection had closed): it can go on another connection.
    NotSent(String, Box<Request<UpBody>>),
    Failed(hyper::Error),
}

impl Lane {
    pub fn handshake(io: UpIo) -> impl Future<Output = hyper::Result<Lane>> {
        let fut = Builder::new().handshake(TokioIo::new(io));
        async move {
            let (send, conn) = fut.await?;
            Ok(Lane::Own {
                send,
                conn: Box::pin(conn),
            })
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Lane::Own { send, .. } | Lane::Shared { send } => send.is_closed(),
        }
    }

    /// Sends `req` and waits for the answer's head. The lane comes back with the answer when the
    /// connection can carry another request once the body has been read.
    pub async fn exchange(
        self,
        req: Request<UpBody>,
    ) -> Result<(Response<Incoming>, Option<Lane>), SendError> {
        match self {
            Lane::Shared { mut send } => {
                if let Err(e) = send.ready().await {
                    return Err(SendError::NotSent(e.to_string(), Box::new(req)));
                }
                match send.try_send_request(req).await {
                    Ok(resp) => Ok((resp, Some(Lane::Shared { send }))),
                    Err(mut e) => Err(match e.take_message() {
                        Some(req) => SendError::NotSent(e.into_error().to_string(), Box::new(req)),
                        None => SendError::Failed(e.into_error()),
                    }),
                }
            }
            Lane::Own { mut send, mut conn } => {
                // Until the connection says it is ready for a request, drive it: that is also
                // where a connection the upstream closed while idle shows that it is gone.
                let ready = poll_fn(|cx| {
                    if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                        return Poll::Ready(Err(match r {
                            Ok(()) => "the upstream closed the connection".to_string(),
                            Err(e) => e.to_string(),
                        }));
                    }
                    send.poll_ready(cx).map_err(|e| e.to_string())
                })
                .await;
                if let Err(why) = ready {
                    return Err(SendError::NotSent(why, Box::new(req)));
                }
                let mut answer = std::pin::pin!(send.try_send_request(req));
                let mut conn_done = false;
                let res = poll_fn(|cx| {
                    if !conn_done && conn.as_mut().poll(cx).is_ready() {
                        conn_done = true;
                    }
                    answer.as_mut().poll(cx)
                })
                .await;
                match res {
                    Ok(resp) => Ok((resp, (!conn_done).then_some(Lane::Own { send, conn }))),
                    Err(mut e) => Err(match e.take_message() {
                        Some(req) => SendError::NotSent(e.into_error().to_string(), Box::new(req)),
                        None => SendError::Failed(e.into_error()),
                    }),
                }
            }
        }
    }
}

/// Idle upstream connections, newest last.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<Vec<(Sender, Instant)>>,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, Vec<(Sender, Instant)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used connection that is still open.
    pub fn take(&self) -> Option<Lane> {
        let mut idle = self.lock();
        while let Some((send, at)) = idle.pop() {
            if !send.is_closed() && at.elapsed() < IDLE {
                return Some(Lane::Shared { send });
            }
        }
        None
    }

    /// Keeps an idle lane for later; a lane driven by a device connection's task gets its own.
    pub fn put(&self, lane: Lane) {
        if lane.is_closed() {
            return;
        }
        let send = match lane {
            Lane::Shared { send } => send,
            Lane::Own { send, conn } => {
                // Outside a runtime (shutting down) there is nobody to drive it: let it close.
                let Ok(rt) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                rt.spawn(async move {
                    let _ = conn.await;
                });
                send
            }
        };
        let mut idle = self.lock();
        idle.retain(|(s, at)| !s.is_closed() && at.elapsed() < IDLE);
        if idle.len() >= POOL_MAX {
            idle.remove(0);
        }
        idle.push((send, Instant::now()));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Idle upstream connections of the direct path, newest last. Nothing reads them while they wait:
/// one the upstream closed meanwhile is found out when it is taken (a read that does not wait),
/// or at the latest when a request on it gets no answer, which the direct path then sends again
/// on a new connection.
#[derive(Default)]
pub struct RawPool {
    idle: Mutex<Vec<(UpIo, Instant)>>,
}

impl RawPool {
    fn lock(&self) -> MutexGuard<'_, Vec<(UpIo, Instant)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used connection that is still open.
    pub fn take(&self) -> Option<UpIo> {
        loop {
            let (mut io, at) = self.lock().pop()?;
            if at.elapsed() < IDLE && still_open(&mut io) {
                return Some(io);
            }
        }
    }

    /// Keeps `io`, last used at `at`.
    pub fn put(&self, io: UpIo, at: Instant) {
        if at.elapsed() >= IDLE {
            return;
        }
        let mut idle = self.lock();
        idle.retain(|(_, at)| at.elapsed() < IDLE);
        if idle.len() >= POOL_MAX {
            idle.remove(0);
        }
        idle.push((io, at));
    }

    pub fn len(&self) -> usize {
        let mut idle = self.lock();
        idle.retain_mut(|(io, at)| at.elapsed() < IDLE && still_open(io));
        idle.len()
    }
}

/// An idle connection is open while a read would wait: end of stream, an error or bytes nobody
/// asked for all mean it cannot carry a request.
pub(super) fn still_open(io: &mut UpIo) -> bool {
    use tokio::io::AsyncRead;
    let mut byte = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    Pin::new(io).poll_read(&mut cx, &mut buf).is_pending()
}

/// What a device connection keeps between its requests: the pool its upstream connections belong
/// to, and the lane the last request used, which goes back to that pool when the device
/// connection ends. The slot holds on to the pool so that a request does not have to take a
/// reference to it, shared by every connection, each time.
#[derive(Default)]
pub struct LaneSlot {
    held: Mutex<Option<Held>>,
}

struct Held {
    pool: Arc<Pool>,
    lane: Option<Lane>,
}

impl LaneSlot {
    fn lock(&self) -> MutexGuard<'_, Option<Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The held lane, if it belongs to `pool`; a lane of another pool (a reload changed the
    /// upstream) goes back to its own. The lane a request takes comes back with `restore`.
    pub fn take(&self, pool: &Arc<Pool>) -> Option<Lane> {
        let mut held = self.lock();
        match held.as_mut() {
            Some(h) if Arc::ptr_eq(&h.pool, pool) => h.lane.take().filter(|l| !l.is_closed()),
            _ => {
                if let Some(Held {
                    pool: old,
                    lane: Some(lane),
                }) = held.take()
                {
                    old.put(lane);
                }
                *held = Some(Held {
                    pool: pool.clone(),
                    lane: None,
                });
                None
            }
        }
    }

    /// Keeps the lane the last request used (taken from this slot, from the pool or new) for
    /// the next one.
    pub fn restore(&self, lane: Lane) {
        if let Some(h) = self.lock().as_mut()
            && let Some(old) = h.lane.replace(lane)
        {
            h.pool.put(old);
        }
    }
}

impl Drop for LaneSlot {
    fn drop(&mut self) {
        if let Some(Held {
            pool,
            lane: Some(lane),
        }) = self.lock().take()
        {
            pool.put(lane);
        }
    }
}

/// An upstream answer's body on its way to the device. For a lane of the device connection's
/// own, polling the body also drives the upstream connection. When the body has been read to the
/// end the lane goes back to the device connection's slot for its next request; a body dropped
/// half-read takes its connection down with it, since what is left of the answer is unread.
pub struct LaneBody {
    inner: Incoming,
    lane: Option<Lane>,
    device: Arc<DeviceConn>,
}

impl LaneBody {
    pub fn new(inner: Incoming, lane: Option<Lane>, device: Arc<DeviceConn>) -> Self {
        LaneBody {
            inner,
            lane,
            device,
        }
    }

    fn give_back(&mut self) {
        if let Some(lane) = self.lane.take() {
            self.device.lanes.restore(lane);
        }
    }
}

impl Body for LaneBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Some(Lane::Own { conn, .. }) = &mut self.lane
            && conn.as_mut().poll(cx).is_ready()
        {
            // The connection is finished; whatever it delivered is still in `inner`.
            self.lane = None;
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.lane = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LaneBody {
    fn drop(&mut self) {
        // A body with nothing to read (HEAD, 204, 304) is dropped unpolled: the lane is still good.
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}
