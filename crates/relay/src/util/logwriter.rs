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
//!
//! The access line has a formatter of its own ([`access`]), as nginx's log module has: it writes
//! the same text `tracing`'s formatter would, without the generic field visiting, so a proxied
//! request pays for its line about what nginx pays for its own.

use std::cell::RefCell;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
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

// ----- the access log's own formatter

/// One device request, as the access log writes it.
pub struct AccessRecord<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub bytes: u64,
    pub duration_ms: u64,
    pub client: std::net::IpAddr,
    /// The phone's MAC, when its User-Agent names one.
    pub mac: Option<&'a str>,
}

/// Where [`access`] writes, once [`install_access`] set it.
static ACCESS: OnceLock<Arc<Shared>> = OnceLock::new();

/// Sends access lines written by [`access`] to `writer`'s buffer. For the plain-text log format
/// without colours only: JSON and coloured output keep `tracing`'s formatter. False when `writer`
/// has no writer thread or one was installed already.
pub fn install_access(writer: &LogWriter) -> bool {
    writer
        .shared
        .as_ref()
        .is_some_and(|s| ACCESS.set(s.clone()).is_ok())
}

thread_local! {
    /// Each thread's line being formatted, and the second its timestamp prefix was made for.
    static LINE: RefCell<(Vec<u8>, u64, [u8; 19])> = const { RefCell::new((Vec::new(), u64::MAX, [0; 19])) };
}

/// Logs one device request: an `INFO` event of target `ucrelay::access`, written by [`access`]'s
/// own formatter when it is installed, else through `tracing`. Either way the log filter decides
/// by target and level (`RUST_LOG=warn` or `ucrelay::access=off` turns it off; a filter on the
/// event's field names is not looked at).
pub fn log_access(r: &AccessRecord<'_>) {
    if tracing::enabled!(target: "ucrelay::access", Level::INFO) && !access(r) {
        via_tracing(r);
    }
}

fn via_tracing(r: &AccessRecord<'_>) {
    tracing::info!(
        target: "ucrelay::access",
        method = %r.method,
        path = %r.path,
        status = r.status,
        bytes = r.bytes,
        duration_ms = r.duration_ms,
        client = %r.client,
        mac = %r.mac.unwrap_or("-"),
        "request"
    );
}

/// Writes `r` as `tracing`'s text formatter writes the event of [`via_tracing`]. False when it
/// cannot (no [`install_access`], a clock outside the years 1970-9999, a thread being torn down):
/// the caller logs through `tracing` then.
fn access(r: &AccessRecord<'_>) -> bool {
    let Some(shared) = ACCESS.get() else {
        return false;
    };
    LINE.try_with(|line| {
        let Ok(mut line) = line.try_borrow_mut() else {
            return false;
        };
        let (buf, second, prefix) = &mut *line;
        buf.clear();
        if !format_access(buf, second, prefix, SystemTime::now(), r) {
            return false;
        }
        shared.append(buf, false);
        if buf.capacity() > 16 * 1024 {
            *buf = Vec::new(); // one long path must not stay in every thread
        }
        true
    })
    .unwrap_or(false)
}

/// False, with nothing written, when `now` is before 1970 or after 9999 (`tracing` writes those
/// years differently).
fn format_access(
    buf: &mut Vec<u8>,
    second: &mut u64,
    prefix: &mut [u8; 19],
    now: SystemTime,
    r: &AccessRecord<'_>,
) -> bool {
    // `2026-12-07T15:00:00.123456Z`, the prefix remade once a second.
    let Ok(since) = now.duration_since(UNIX_EPOCH) else {
        return false;
    };
    if since.as_secs() != *second {
        let Some(t) = i64::try_from(since.as_secs())
            .ok()
            .and_then(|s| jiff::Timestamp::from_second(s).ok())
        else {
            return false;
        };
        let text = t.strftime("%Y-%m-%dT%H:%M:%S").to_string();
        if text.len() != prefix.len() {
            return false;
        }
        prefix.copy_from_slice(text.as_bytes());
        *second = since.as_secs();
    }
    buf.extend_from_slice(prefix);
    let _ = writeln!(
        buf,
        ".{:06}Z  INFO ucrelay::access: request method={} path={} status={} bytes={} duration_ms={} client={} mac={}",
        since.subsec_micros(),
        r.method,
        r.path,
        r.status,
        r.bytes,
        r.duration_ms,
        r.client,
        r.mac.unwrap_or("-"),
    );
    true
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

    fn record<'a>(path: &'a str, mac: Option<&'a str>) -> AccessRecord<'a> {
        AccessRecord {
            method: "GET",
            path,
            status: 200,
            bytes: 2048,
            duration_ms: 3,
            client: "192.0.2.7".parse().unwrap(),
            mac,
        }
    }

    /// What `tracing`'s text formatter writes for the same record, as the daemon configures it.
    fn tracing_line(r: &AccessRecord<'_>) -> String {
        let sink = Sink::default();
        let out = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || via_tracing(r));
        sink.text()
    }

    fn own_line(r: &AccessRecord<'_>, now: SystemTime) -> String {
        let mut buf = Vec::new();
        let (mut second, mut prefix) = (u64::MAX, [0u8; 19]);
        assert!(format_access(&mut buf, &mut second, &mut prefix, now, r));
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn the_access_line_is_the_one_tracing_would_write() {
        for r in [
            record("/provisioning/0004f2abcdef.cfg", Some("0004f2abcdef")),
            record("/", None),
            record("/a%20b/%C3%A9?x=1", None),
        ] {
            let theirs = tracing_line(&r);
            let ours = own_line(&r, SystemTime::now());
            // Everything after the timestamp is the same.
            let (_, theirs_rest) = theirs.split_once(' ').unwrap();
            let (ts, ours_rest) = ours.split_once(' ').unwrap();
            assert_eq!(ours_rest, theirs_rest);
            assert!(ts.len() == 27 && ts.ends_with('Z'), "{ts}");
        }
    }

    #[test]
    fn the_access_timestamp_is_utc_to_the_microsecond() {
        let r = record("/", None);
        let at = |s: u64, us: u64| UNIX_EPOCH + Duration::from_secs(s) + Duration::from_micros(us);
        assert!(own_line(&r, at(0, 0)).starts_with("1970-01-01T00:00:00.000000Z  INFO "));
        assert!(
            own_line(&r, at(1_796_650_981, 42)).starts_with("2026-12-07T13:43:01.000042Z  INFO ")
        );
        // The prefix made for one second is not reused for the next.
        let (mut buf, mut second, mut prefix) = (Vec::new(), u64::MAX, [0u8; 19]);
        assert!(format_access(
            &mut buf,
            &mut second,
            &mut prefix,
            at(59, 999_999),
            &r
        ));
        assert!(format_access(
            &mut buf,
            &mut second,
            &mut prefix,
            at(60, 1),
            &r
        ));
        let text = String::from_utf8(buf).unwrap();
        let stamps: Vec<&str> = text.lines().map(|l| &l[..27]).collect();
        assert_eq!(
            stamps,
            ["1970-01-01T00:00:59.999999Z", "1970-01-01T00:01:00.000001Z"]
        );
        // A clock tracing writes otherwise is left to tracing.
        let before = UNIX_EPOCH - Duration::from_secs(1);
        let far = UNIX_EPOCH + Duration::from_secs(300_000_000_000);
        for t in [before, far] {
            let mut buf = Vec::new();
            assert!(!format_access(&mut buf, &mut second, &mut prefix, t, &r));
            assert!(buf.is_empty());
        }
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
