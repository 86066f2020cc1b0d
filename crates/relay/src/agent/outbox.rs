//! The results sender: drains the outbox to `POST /relay/v1/results` in batches. A result leaves the
//! store only when the cloud lists its id as accepted, so an outage or a restart loses nothing, and the
//! stable ids let the cloud drop the duplicates a lost answer causes.

use crate::cloud::Sessions;
use crate::ctx::Ctx;
use crate::protocol::{ErrorCode, PATH_RESULTS, ResultsAck, ResultsBatch};
use crate::util::backoff::{Backoff, sleep_or_shutdown};
use anyhow::Result;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

/// Results per `POST /relay/v1/results`: a 50,000-target task's results leave in 50 requests (and
/// 50 removals from the store), not 500, so the outbox keeps up with the devices.
const BATCH: usize = 1000;
/// Stored JSON per batch at most (a single larger record is sent alone): a screen capture is
/// megabytes, and a hundred of them must not make one request.
const BATCH_BYTES: usize = 4 << 20;
/// Even without a wake-up, look at the outbox this often.
const SWEEP: Duration = Duration::from_secs(30);
/// How soon the outbox is read again after the store refused.
const STORE_RETRY: Duration = Duration::from_secs(2);

/// A store error in the sender: a full disk or a store reopening after an I/O error is waited out
/// (the results stay where they are); anything else stops the agent.
fn store_trouble(ctx: &Ctx, e: &crate::store::StoreError) -> Result<()> {
    if e.is_transient() {
        warn!(error = %format!("{e:#}"), "results wait: the store cannot be used now");
        ctx.status.lock().last_results_error = Some(e.to_string());
        Ok(())
    } else {
        Err(anyhow::anyhow!("{e:#}"))
    }
}

pub async fn run(ctx: Ctx, sessions: Arc<Sessions>, shutdown: CancellationToken) -> Result<()> {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut session_rx = sessions.subscribe();
    // After the cloud refuses a batch as malformed, send one result at a time to find the bad one.
    let mut batch_size = BATCH;
    loop {
        // Drain while there is a session and something to send.
        while let Some(session) = sessions.current() {
            let batch = match ctx
                .store
                .run(move |s| s.outbox_batch(batch_size, BATCH_BYTES))
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    store_trouble(&ctx, &e)?;
                    break;
                }
            };
            if batch.is_empty() {
                break;
            }
            let body = ResultsBatch {
                results: batch.iter().map(|(_, r)| r.clone()).collect(),
            };
            let sent = ctx
                .cloud
                .json::<_, ResultsAck>(
                    http::Method::POST,
                    PATH_RESULTS,
                    Some(&session.token),
                    Some(&body),
                )
                .await;
            match sent {
                Ok(ack) => {
                    let accepted: HashSet<&str> = ack.accepted.iter().map(String::as_str).collect();
                    let keys: Vec<u64> = batch
                        .iter()
                        .filter(|(_, r)| accepted.contains(r.result_id.as_str()))
                        .map(|(k, _)| *k)
                        .collect();
                    let n = keys.len() as u64;
                    if let Err(e) = ctx.store.run(move |s| s.outbox_remove(&keys)).await {
                        // Sent again later; the cloud drops the duplicates by id.
                        store_trouble(&ctx, &e)?;
                        break;
                    }
                    debug!(sent = n, duplicates = ack.duplicates, "results delivered");
                    {
                        let mut st = ctx.status.lock();
                        st.results_sent += n;
                        st.last_results_error = None;
                    }
                    backoff.reset();
                    batch_size = BATCH;
                    if n == 0 {
                        // The cloud took nothing: do not spin on the same batch.
                        warn!(
                            "cloud acknowledged none of {} results; retrying later",
                            batch.len()
                        );
                        if !sleep_or_shutdown(backoff.next_delay(), &shutdown).await {
                            return Ok(());
                        }
                    }
                }
                // 400: the cloud cannot read something in the batch; 413: something in it is
                // larger than the cloud takes. Either way one record must not block the rest.
                Err(e) if matches!(e.code(), Some(ErrorCode::BadRequest | ErrorCode::TooLarge)) => {
                    if batch.len() > 1 {
                        warn!(error = %e, "cloud refused a results batch; sending one at a time to isolate it");
                        batch_size = 1;
                    } else {
                        // Retrying a result the cloud cannot read would block every later one.
                        let (key, rec) = &batch[0];
                        error!(result_id = %rec.result_id, command_id = %rec.command_id, error = %e,
                            "cloud refused a result (malformed or too large); kept in the store's rejected table, not retried");
                        let (key, why) = (*key, e.to_string());
                        if let Err(e) = ctx.store.run(move |s| s.outbox_reject(key, &why)).await {
                            store_trouble(&ctx, &e)?;
                            break;
                        }
                        ctx.status.lock().results_rejected += 1;
                    }
                }
                Err(e) => {
                    if e.code() == Some(ErrorCode::TokenInvalid) {
                        sessions.invalidate(session.generation);
                    }
                    let d = backoff.next_delay();
                    warn!(error = %e, retry_in = ?d, pending = batch.len(), "cannot deliver results");
                    ctx.status.lock().last_results_error = Some(e.to_string());
                    if !sleep_or_shutdown(d, &shutdown).await {
                        return Ok(());
                    }
                }
            }
        }
        tokio::select! {
            _ = ctx.results_wake.notified() => {}
            changed = session_rx.changed() => if changed.is_err() { return Ok(()) },
            // While the store refuses work, look again soon: it recovers by itself.
            _ = tokio::time::sleep(if ctx.store.trouble().is_some() { STORE_RETRY } else { SWEEP }) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}
