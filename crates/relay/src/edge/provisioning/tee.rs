//! The request body sent upstream: the device's body as it came, or, for a device log the relay
//! keeps a copy of, the same body teed into the device log store chunk by chunk as it passes.
//! The forward is never changed and the body is never buffered: a chunk waits only while the
//! store's small queue is full.

use crate::devlogs::LogUpload;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

/// What a lane sends upstream.
pub enum UpBody {
    Plain(Incoming),
    Tee(Box<Tee>),
}

/// A body with a copy going to the device log store.
pub struct Tee {
    inner: Incoming,
    copy: Option<LogUpload>,
}

impl UpBody {
    pub fn tee(inner: Incoming, copy: LogUpload) -> UpBody {
        UpBody::Tee(Box::new(Tee {
            inner,
            copy: Some(copy),
        }))
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpBody::Plain(b) => Pin::new(b).poll_frame(cx),
            UpBody::Tee(t) => t.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Plain(b) => b.is_end_stream(),
            // Not over until the copy has been told the body ended (one more poll).
            UpBody::Tee(t) => {
                t.inner.is_end_stream() && t.copy.as_ref().is_none_or(|c| c.is_ended())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Plain(b) => b.size_hint(),
            UpBody::Tee(t) => t.inner.size_hint(),
        }
    }
}

impl Tee {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(c) = self.copy.as_mut().filter(|c| !c.is_ended()) {
            ready!(c.poll_ready(cx));
        }
        let polled = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let (Some(c), Some(data)) = (self.copy.as_mut(), frame.data_ref())
                    && !c.is_ended()
                {
                    // With a Content-Length the client stops polling after the last byte: the
                    // copy learns the end with it.
                    if self.inner.is_end_stream() {
                        c.send_last(data.clone());
                    } else {
                        c.send(data.clone());
                    }
                }
            }
            None => {
                if let Some(c) = self.copy.as_mut() {
                    c.end();
                }
            }
            // A broken body is not kept.
            Some(Err(_)) => self.copy = None,
        }
        Poll::Ready(polled)
    }
}
