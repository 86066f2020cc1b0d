//! How the management agent reaches the other jobs: the daemon's implementation of
//! [`agent::Dispatch`]. Device commands and tasks go to the device plane, `relay_status` to the
//! operations report, announced revisions to the download agent and the device monitor.

use crate::agent::{self, JobsReport};
use crate::devices::{self, DevicePlane};
use crate::edge;
use crate::ops::{Running, report::StatusReport};
use crate::protocol::{
    AgentState, CertificateUpload, Command, DEVICE_COMMANDS, DEVICE_TRUST_COMMAND,
    INSTALL_CERTIFICATE_COMMAND, Outcome, RELAY_DEVICE_COMMANDS, ResultRecord, TASK_CANCEL_COMMAND,
    TASK_UPDATE_COMMAND,
};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tracing::{info, warn};

/// The jobs the daemon started, as the agent's [`agent::Dispatch`].
pub struct Jobs {
    pub running: Running,
}

impl Jobs {
    fn devices(&self) -> &DevicePlane {
        &self.running.devices
    }

    async fn execute(&self, cmd: &Command) -> ResultRecord {
        let done = |d: devices::actions::Done| agent::record(cmd, d.result, d.reason, d.payload);
        match cmd.name.as_str() {
            name if DEVICE_COMMANDS.contains(&name) => self.devices().command(cmd).await,
            name if RELAY_DEVICE_COMMANDS.contains(&name) => {
                self.devices().relay_command(cmd).await
            }
            TASK_CANCEL_COMMAND => done(devices::tasks::cancel(self.devices(), &cmd.params).await),
            TASK_UPDATE_COMMAND => done(devices::tasks::update(self.devices(), &cmd.params).await),
            INSTALL_CERTIFICATE_COMMAND => self.install_certificate(cmd).await,
            DEVICE_TRUST_COMMAND => self.devices().trust_command(cmd).await,
            "relay_status" => {
                let ctx = &self.running.ctx;
                let pending = ctx.store.run(|s| s.outbox_len()).await.unwrap_or(0);
                let report = StatusReport::build(&self.running, pending);
                match serde_json::to_value(report) {
                    Ok(v) => agent::record(cmd, Outcome::Success, "", v),
                    Err(e) => agent::record(
                        cmd,
                        Outcome::Failure,
                        format!("cannot encode status: {e}"),
                        serde_json::Value::Null,
                    ),
                }
            }
            other => {
                warn!(command_id = %cmd.id, name = %other, "unknown command");
                agent::record(
                    cmd,
                    Outcome::NotApplicable,
                    format!(
                        "unknown command {other:?} (ucrelay {} does not support it)",
                        crate::util::build::VERSION
                    ),
                    serde_json::Value::Null,
                )
            }
        }
    }
}

impl Jobs {
    /// `install_certificate`: the tenant's certificate, pushed by the cloud, goes to the edge,
    /// which checks it by the rules of `ucrelay check` and swaps it in when it passes.
    async fn install_certificate(&self, cmd: &Command) -> ResultRecord {
        let Some(edge) = self.running.edge.clone() else {
            return agent::record(
                cmd,
                Outcome::NotApplicable,
                "this relay has no [edge] section: it serves no certificate",
                serde_json::Value::Null,
            );
        };
        let upload: CertificateUpload = match serde_json::from_value(cmd.params.clone()) {
            Ok(u) => u,
            Err(e) => {
                return agent::record(
                    cmd,
                    Outcome::Failure,
                    format!("bad parameters: {e}"),
                    serde_json::Value::Null,
                );
            }
        };
        let done = tokio::task::spawn_blocking(move || {
            edge::cloudcert::install(&edge, &upload, std::time::SystemTime::now())
        })
        .await;
        match done {
            Ok(i) => agent::record(
                cmd,
                i.outcome,
                i.reason,
                serde_json::to_value(i.answer).unwrap_or_default(),
            ),
            Err(e) => agent::record(
                cmd,
                Outcome::Failure,
                format!("internal error while installing the certificate: {e}"),
                serde_json::Value::Null,
            ),
        }
    }
}

fn state(state: &str, reason: Option<String>) -> AgentState {
    AgentState {
        state: state.into(),
        reason,
    }
}

impl agent::Dispatch for Jobs {
    fn accept_task<'a>(&'a self, cmd: &'a Command) -> BoxFuture<'a, agent::TaskAccept> {
        async move {
            match devices::tasks::accept(&self.running.ctx, self.devices(), cmd).await {
                devices::tasks::TaskAccept::Stored => agent::TaskAccept::Stored,
                devices::tasks::TaskAccept::Busy(why) => agent::TaskAccept::Busy(why),
                devices::tasks::TaskAccept::Failed => agent::TaskAccept::Failed,
            }
        }
        .boxed()
    }

    fn execute<'a>(&'a self, cmd: &'a Command) -> BoxFuture<'a, ResultRecord> {
        Jobs::execute(self, cmd).boxed()
    }

    fn report(&self) -> JobsReport {
        let off = || state("off", Some("not configured".into()));
        let (download, images) = match &self.running.images {
            None => (off(), Vec::new()),
            Some(cat) => {
                let r = cat.report();
                let download = match (&r.refused, r.images.iter().find(|i| i.state == "failed")) {
                    (Some(why), _) => state("degraded", Some(format!("manifest refused: {why}"))),
                    (None, Some(i)) => state(
                        "degraded",
                        Some(format!(
                            "image {} failed: {}",
                            i.id,
                            i.reason.clone().unwrap_or_default()
                        )),
                    ),
                    (None, None) => state("ok", None),
                };
                (download, cat.heartbeat_states())
            }
        };
        JobsReport {
            download,
            provisioning: if self.running.edge.is_some() {
                state("ok", None)
            } else {
                off()
            },
            images,
            devices: self.devices().registry.counts(),
            tasks: self.devices().tasks.counts(),
        }
    }

    fn images_revision(&self, revision: u64, asked: bool) {
        match &self.running.images {
            Some(cat) if asked => {
                info!(revision, "cloud asked for an image sync");
                cat.wake.notify_one();
            }
            // A heartbeat repeats the revision every time: only news wakes the download agent.
            Some(cat) if cat.is_new_revision(revision) => cat.wake.notify_one(),
            Some(_) => {}
            None if asked => info!(
                revision,
                "cloud asked for an image sync, but [images] is not configured"
            ),
            None => {}
        }
    }

    fn devices_revision(&self, revision: u64) {
        self.devices().registry.note_revision(revision);
    }

    fn leases(&self, leases: &[String], as_of: std::time::Instant) {
        devices::tasks::leases(&self.running.ctx, &self.running.devices, leases, as_of);
    }
}
