//! One device connection: the state of its socket (last activity, whether the kernel took the last
//! write) and what its requests share.

use super::Edge;
use super::provisioning::{LaneSlot, Upstream};
use futures_util::task::AtomicWaker;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a device connection's socket has been doing: when it last moved a byte (for the idle
/// watchdog), and whether its last write found the kernel's send buffer full.
///
/// An image download reads the second to make its next chunk only once the socket has taken
/// what was already written (see `edge::images`). Otherwise hyper queues one more chunk
/// behind the TLS record that is waiting for the socket, and with a thousand slow downloads
/// those idle chunks add up to tens of megabytes. The kernel's send buffer, not ours, is what
/// keeps the wire busy in the meantime.
pub struct SocketState {
    started: Instant,
    last_ms: AtomicU64,
    blocked: AtomicBool,
    unblocked: AtomicWaker,
}

impl SocketState {
    pub(crate) fn new() -> SocketState {
        SocketState {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
            blocked: AtomicBool::new(false),
            unblocked: AtomicWaker::new(),
        }
    }

    pub(crate) fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// Ready while the socket takes writes; otherwise wakes the caller once a write goes through.
    pub fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.blocked.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.unblocked.register(cx.waker());
        if self.blocked.load(Ordering::Acquire) {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    fn wrote(&self, r: &Poll<std::io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.last_ms
                    .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
                if self.blocked.swap(false, Ordering::AcqRel) {
                    self.unblocked.wake();
                }
            }
            Poll::Pending => self.blocked.store(true, Ordering::Release),
            _ => {}
        }
    }
}

/// One device connection: what its requests share. Each request holds a reference to this,
/// which only its own connection touches, instead of references to the edge-wide values, which
/// every connection would touch (see `util::shard`).
pub struct DeviceConn {
    pub(crate) edge: Arc<Edge>,
    pub peer: SocketAddr,
    /// `https`, or `http` on the legacy listener.
    pub scheme: &'static str,
    /// Paces image bodies.
    pub socket: Arc<SocketState>,
    /// The upstream in service when the connection started, with its generation.
    pub(crate) upstream: (u64, Option<Arc<Upstream>>),
    /// The upstream connection the requests use, kept between them.
    pub(crate) lanes: LaneSlot,
}

/// The device's TCP stream (under TLS, when there is TLS), reporting to its `SocketState`.
pub(crate) struct ActivityIo<T> {
    pub(crate) inner: T,
    pub(crate) state: Arc<SocketState>,
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.last_ms.store(
                self.state.started.elapsed().as_millis() as u64,
                Ordering::Relaxed,
            );
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        self.state.wrote(&r);
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.state.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Flag(AtomicBool);
    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn socket_state_blocks_until_a_write_goes_through() {
        use tokio::io::AsyncReadExt;
        let (near, mut far) = tokio::io::duplex(4096);
        let state = Arc::new(SocketState::new());
        let mut io = ActivityIo {
            inner: near,
            state: state.clone(),
        };
        let woken = Arc::new(Flag(AtomicBool::new(false)));
        let waker = std::task::Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(
            state.poll_writable(&mut cx).is_ready(),
            "a fresh socket takes writes"
        );
        // Fill the pipe until a write is refused.
        let chunk = [7u8; 1024];
        let mut refused = false;
        for _ in 0..16 {
            if Pin::new(&mut io).poll_write(&mut cx, &chunk).is_pending() {
                refused = true;
                break;
            }
        }
        assert!(refused, "the 4 KiB pipe filled up");
        assert!(state.poll_writable(&mut cx).is_pending());
        assert!(!woken.0.load(Ordering::SeqCst));
        // The peer reads; the next write goes through and wakes whoever waited.
        let mut sink = vec![0u8; 4096];
        far.read_exact(&mut sink).await.unwrap();
        assert!(matches!(
            Pin::new(&mut io).poll_write(&mut cx, &chunk),
            Poll::Ready(Ok(1024))
        ));
        assert!(woken.0.load(Ordering::SeqCst), "the waiting body was woken");
        assert!(state.poll_writable(&mut cx).is_ready());
        assert!(state.idle_for() < Duration::from_secs(5));
    }
}
