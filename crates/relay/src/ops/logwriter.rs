//! Where the daemon's log lines go: stderr (the journal, under systemd), through a buffer that a
//! background thread writes out.
//!
//! Every device request logs an access line, so a write or a thread wake-up per line would be paid
//! on the request path. Instead a line is appended to a shared buffer under a short lock, and the
//! writer thread is woken only when the buffer stops being empty, when it passes [`BATCH`] bytes,
//! or when a warning or an error arrives. Otherwise it writes at most [`LINGER`] after the first
//! line of a batch, like nginx's `access_log ... buffer= flush=`. An idle daemon's writer thread
//! sleeps without a timer.
//!
//! Nothing is dropped: when stderr cannot keep up and [`CAP`] bytes are waiting, loggers wait for
//! the writer. The guard writes what is left on exit.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::Level;

/// Bytes that make the writer write without waiting for [`LINGER`].
pub const BATCH: usize = 64 * 1024;
/// How long a line may wait in the buffer at most.
pub const LINGER: Duration = Duration::from_millis(100);
/// Bytes waiting at which loggers block until the writer catches up.
pub const CAP: usize = 4 * 1024 * 1024;

#[derive(Default)]
struct State {
    data: Vec<u8>,
    /// A warning or an error is waiting: write now.
    urgent: bool,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer thread.
    work: Condvar,
    /// Wakes loggers waiting for room.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a buffer of bytes: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn append(&self, bytes: &[u8], urgent: bool) {
        let mut st = self.lock();
        while st.data.len() >= CAP && !st.closed {
            st = self.room.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let was_empty = st.data.is_empty();
        st.data.extend_from_slice(bytes);
        let wake = was_empty || urgent || st.data.len() >= BATCH;
        st.urgent |= urgent;
        drop(st);
        if wake {
            self.work.notify_one();
        }
    }
}

/// The `MakeWriter` for `tracing_subscriber::fmt`: each event is one `write` of a whole line.
#[derive(Clone)]
pub struct LogWriter {
    /// `None`: no writer thread (it could not be started); lines go straight to stderr.
    shared: Option<Arc<Shared>>,
}

impl LogWriter {
    /// Writes each line to stderr at once, for when the writer thread cannot be started.
    pub fn direct() -> LogWriter {
        LogWriter { shared: None }
    }
}

/// Writes out what is left and stops the writer thread when dropped.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread for `out` (stderr in the daemon).
pub fn spawn<W: Write + Send + 'static>(out: W) -> std::io::Result<(LogWriter, LogGuard)> {
    spawn_with(out, LINGER)
}

fn spawn_with<W: Write + Send + 'static>(
    out: W,
    linger: Duration,
) -> std::io::Result<(LogWriter, LogGuard)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        work: Condvar::new(),
        room: Condvar::new(),
    });
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name("ucrelay-log".into())
        .spawn(move || writer_loop(&s, out, linger))?;
    Ok((
        LogWriter {
            shared: Some(shared.clone()),
        },
        LogGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

fn writer_loop<W: Write>(shared: &Shared, mut out: W, linger: Duration) {
    let mut spare = Vec::with_capacity(BATCH);
    loop {
        let mut st = shared.lock();
        // Sleep until there is something to write.
        while st.data.is_empty() && !st.closed {
            st = shared.work.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        // Then give the batch up to `linger` to fill, unless it must go now.
        let deadline = Instant::now() + linger;
        while !st.urgent && !st.closed && st.data.len() < BATCH {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = shared
                .work
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let closed = st.closed;
        std::mem::swap(&mut st.data, &mut spare);
        st.urgent = false;
        drop(st);
        shared.room.notify_all();
        // Lines that cannot be written (stderr closed) have nowhere else to go.
        let _ = out.write_all(&spare).and_then(|()| out.flush());
        spare.clear();
        if spare.capacity() > 4 * BATCH {
            spare.shrink_to(BATCH);
        }
        if closed && shared.lock().data.is_empty() {
            return;
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.work.notify_one();
        self.shared.room.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One event's line; `urgent` for warnings and errors.
pub struct Line<'a> {
    shared: Option<&'a Shared>,
    urgent: bool,
}

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.shared {
            Some(s) => s.append(buf, self.urgent),
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            shared: self.shared.as_deref(),
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Line<'a> {
        Line {
            shared: self.shared.as_deref(),
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::MakeWriter;

    /// A `Write` whose contents the test can read, counting write calls.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let mut g = self.0.lock().unwrap();
            g.0.extend_from_slice(b);
            g.1 += 1;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().0.clone()).unwrap()
        }
        fn writes(&self) -> usize {
            self.0.lock().unwrap().1
        }
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Long enough that only a full batch, a warning or the guard can make the writer write.
    const FOREVER: Duration = Duration::from_secs(3600);

    #[test]
    fn lines_wait_for_a_batch_and_go_out_in_order_on_exit() {
        let sink = Sink::default();
        let (w, guard) = spawn_with(sink.clone(), FOREVER).unwrap();
        for i in 0..1000 {
            writeln!(w.make_writer(), "line {i}").unwrap();
        }
        assert_eq!(
            sink.writes(),
            0,
            "9 KB of lines were written before a batch filled"
        );
        drop(guard);
        let want: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(sink.text(), want);
        assert_eq!(sink.writes(), 1);
    }

    #[test]
    fn a_full_batch_is_written_without_waiting() {
        let sink = Sink::default();
        let (w, _guard) = spawn_with(sink.clone(), FOREVER).unwrap();
        let line = format!("{}\n", "x".repeat(1023));
        for _ in 0..BATCH / 1024 {
            w.make_writer().write_all(line.as_bytes()).unwrap();
        }
        wait_for("the batch", || sink.text().len() == BATCH);
    }

    #[test]
    fn a_warning_goes_out_at_once() {
        let sink = Sink::default();
        let (w, guard) = spawn_with(sink.clone(), FOREVER).unwrap();
        let warn = tracing::Metadata::new(
            "w",
            "t",
            Level::WARN,
            None,
            None,
            None,
            tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CS)),
            tracing::metadata::Kind::EVENT,
        );
        writeln!(w.make_writer(), "info").unwrap();
        writeln!(w.make_writer_for(&warn), "warn").unwrap();
        wait_for("the warning", || sink.text() == "info\nwarn\n");
        writeln!(w.make_writer(), "last").unwrap();
        drop(guard);
        assert_eq!(sink.text(), "info\nwarn\nlast\n");
    }

    struct Cs;
    impl tracing::Callsite for Cs {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &tracing::Metadata<'_> {
            unreachable!()
        }
    }
    static CS: Cs = Cs;
}
