//! Where the reference cloud sends work when a tenant has several relays: the monitoring share of
//! each relay (with its `devices_revision`), the split of a task's targets into leases, leases
//! taken back from a relay that went silent and their unfinished targets given to others, and the
//! relay a device command goes to. The rules themselves are in `fleet`; this file applies them to
//! the cloud's data, under the cloud's lock.

use super::Runtime;
use super::fleet::{self, Reach, Site};
use super::state::{CommandRecord, CommandState, LeaseRecord, ShareRevision, StoredResult};
use crate::protocol::{Outcome, ResultRecord, TASK_COMMAND, TaskSpec};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};
use tracing::{info, warn};

/// The cached monitoring shares of one tenant and the inputs they were computed from.
#[derive(Debug, Default)]
pub(crate) struct ShareCache {
    key: u64,
    pub by_relay: HashMap<String, Vec<usize>>,
}

/// Which relays count for a piece of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// Heartbeat within `inactive_after`: may poll devices.
    Active,
    /// Active, and its channel not down for `inactive_after`: may hold task targets.
    Live,
    /// Any relay of the tenant.
    Any,
}

/// How a new task's targets are spread.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Per relay, its targets, in the order the task lists them.
    pub by_relay: Vec<(String, Vec<String>)>,
    /// Targets no relay can reach, with the reason.
    pub unreachable: Vec<(String, String)>,
    /// Some target could be served by more than one relay: the targets are leased.
    pub movable: bool,
}

fn fnv(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= u64::from(*b);
        *h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

impl Runtime {
    /// The sites of `tenant`.
    pub fn sites_of(&self, tenant: &str) -> Vec<Site> {
        self.db
            .p
            .sites
            .iter()
            .filter(|s| s.tenant_id == tenant)
            .cloned()
            .collect()
    }

    /// Since when the relay's channel has been down (`None`: up now).
    pub fn channel_down_since(&self, relay_id: &str) -> Option<SystemTime> {
        if self.channels.contains_key(relay_id) {
            return None;
        }
        Some(
            self.channel_down
                .get(relay_id)
                .copied()
                .unwrap_or(self.started_at),
        )
    }

    fn is(&self, relay_id: &str, want: Liveness, now: SystemTime, after: Duration) -> bool {
        let Some(r) = self.db.p.relays.get(relay_id) else {
            return false;
        };
        match want {
            Liveness::Any => true,
            Liveness::Active => r.is_active(now, after),
            Liveness::Live => {
                r.is_active(now, after)
                    && self.channel_down_since(relay_id).is_none_or(|since| {
                        now.duration_since(since).map(|d| d < after).unwrap_or(true)
                    })
            }
        }
    }

    /// The relays of `tenant` that are `want`, with what routing needs of them, in id order.
    pub fn reach_list(
        &self,
        tenant: &str,
        sites: &[Site],
        want: Liveness,
        now: SystemTime,
        after: Duration,
    ) -> Vec<Reach> {
        self.db
            .p
            .relays
            .values()
            .filter(|r| r.tenant_id == tenant && self.is(&r.relay_id, want, now, after))
            .map(|r| Reach {
                relay_id: r.relay_id.clone(),
                site: fleet::relay_site(sites, &r.addresses),
                subnets: r
                    .subnets
                    .as_ref()
                    .map(|list| list.iter().filter_map(|n| n.parse().ok()).collect()),
            })
            .collect()
    }

    /// Brings the tenant's monitoring shares up to date (only when the device list, the sites or
    /// the active relays changed) and gives a new revision to each relay whose share changed.
    pub fn refresh_shares(&mut self, tenant: &str, now: SystemTime, after: Duration) {
        let sites = self.sites_of(tenant);
        let relays = self.reach_list(tenant, &sites, Liveness::Active, now, after);
        let list_revision = self.db.devices_revision(tenant);
        let mut key: u64 = 0xcbf2_9ce4_8422_2325;
        fnv(&mut key, &list_revision.to_le_bytes());
        for r in &relays {
            fnv(&mut key, r.relay_id.as_bytes());
            fnv(&mut key, format!("{:?}{:?}", r.site, r.subnets).as_bytes());
        }
        fnv(&mut key, format!("{sites:?}").as_bytes());
        let all: Vec<String> = self
            .db
            .p
            .relays
            .values()
            .filter(|r| r.tenant_id == tenant)
            .map(|r| r.relay_id.clone())
            .collect();
        if self.shares.get(tenant).is_some_and(|c| c.key == key)
            && all
                .iter()
                .all(|r| self.db.p.share_revisions.contains_key(r))
        {
            return;
        }
        let empty = Vec::new();
        let addresses: Vec<String> = self
            .db
            .p
            .device_lists
            .get(tenant)
            .map(|l| l.devices.iter().map(|d| d.address.clone()).collect())
            .unwrap_or_default();
        let by_relay = fleet::shares(&sites, &addresses, &relays);
        for relay in &all {
            let share = by_relay.get(relay).unwrap_or(&empty);
            let fingerprint = fleet::fingerprint(&addresses, share);
            let old = self
                .db
                .p
                .share_revisions
                .get(relay)
                .copied()
                .unwrap_or_default();
            if old.fingerprint != fingerprint || !self.db.p.share_revisions.contains_key(relay) {
                let revision = if share.is_empty() && old.revision == 0 {
                    0
                } else {
                    (old.revision + 1).max(list_revision)
                };
                self.db.p.share_revisions.insert(
                    relay.clone(),
                    ShareRevision {
                        revision,
                        fingerprint,
                    },
                );
                if revision != old.revision {
                    info!(relay_id = %relay, devices = share.len(), revision, "monitoring share changed");
                }
            }
        }
        self.shares
            .insert(tenant.to_owned(), ShareCache { key, by_relay });
    }

    /// The devices a relay polls (indexes into its tenant's device list) and their revision.
    pub fn share_of(&self, tenant: &str, relay_id: &str) -> (u64, Vec<usize>) {
        let revision = self
            .db
            .p
            .share_revisions
            .get(relay_id)
            .map_or(0, |r| r.revision);
        let share = self
            .shares
            .get(tenant)
            .and_then(|c| c.by_relay.get(relay_id))
            .cloned()
            .unwrap_or_default();
        (revision, share)
    }

    /// Unfinished leased targets per relay: what "least loaded" compares.
    pub fn loads(&self) -> HashMap<String, u64> {
        let mut load: HashMap<String, u64> = HashMap::new();
        for (t, task) in self.db.p.tasks.iter().enumerate() {
            let view = self.db.task_view(t);
            for l in task.leases.iter().filter(|l| l.revoked_at.is_none()) {
                let open = l.targets.iter().filter(|x| !view.has(x)).count() as u64;
                *load.entry(l.relay_id.clone()).or_default() += open;
            }
        }
        load
    }

    /// Splits targets over the relays of `tenant` that can reach them: live relays first, least
    /// loaded; a target only offline relays can reach waits for one of them; a target no relay
    /// can reach is `unreachable`.
    pub fn plan(
        &self,
        tenant: &str,
        targets: &[String],
        exclude: Option<&str>,
        now: SystemTime,
        after: Duration,
    ) -> Plan {
        let sites = self.sites_of(tenant);
        let not_excluded = |r: &Reach| exclude != Some(r.relay_id.as_str());
        let live: Vec<Reach> = self
            .reach_list(tenant, &sites, Liveness::Live, now, after)
            .into_iter()
            .filter(not_excluded)
            .collect();
        let any: Vec<Reach> = self
            .reach_list(tenant, &sites, Liveness::Any, now, after)
            .into_iter()
            .filter(not_excluded)
            .collect();
        let mut load = self.loads();
        let mut plan = Plan::default();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut seen = HashSet::new();
        for target in targets {
            let target = target.trim();
            if !seen.insert(target) {
                continue;
            }
            let Some(ip) = fleet::device_ip(target) else {
                plan.unreachable.push((
                    target.to_owned(),
                    format!("{target} is not a device address (IP or IP:PORT)"),
                ));
                continue;
            };
            let site = fleet::site_of(&sites, ip);
            let reaching: Vec<&Reach> =
                any.iter().filter(|r| r.reaches(&sites, ip, site)).collect();
            if reaching.len() > 1 {
                plan.movable = true;
            }
            let live_reaching: Vec<&Reach> = live
                .iter()
                .filter(|r| r.reaches(&sites, ip, site))
                .collect();
            let pool = if live_reaching.is_empty() {
                &reaching
            } else {
                &live_reaching
            };
            match fleet::least_loaded(pool, &mut load) {
                Some(r) => {
                    let i = *index.entry(r.relay_id.clone()).or_insert_with(|| {
                        plan.by_relay.push((r.relay_id.clone(), Vec::new()));
                        plan.by_relay.len() - 1
                    });
                    plan.by_relay[i].1.push(target.to_owned());
                }
                None => plan.unreachable.push((
                    target.to_owned(),
                    fleet::unreachable_reason(&sites, target, site),
                )),
            }
        }
        plan
    }

    /// Records the cloud's own failure result for a target no relay can reach.
    pub fn answer_unreachable(&mut self, task_id: &str, kind: &str, target: &str, reason: &str) {
        let record = ResultRecord {
            result_id: format!("cloud-{}", uuid::Uuid::new_v4()),
            command_id: task_id.to_owned(),
            target: Some(target.to_owned()),
            name: kind.to_owned(),
            result: Outcome::Failure,
            reason: reason.to_owned(),
            payload: serde_json::Value::Null,
            finished_at: super::state::fmt_time(SystemTime::now()),
            progress: None,
        };
        self.db.add_cloud_result(StoredResult {
            relay_id: String::new(),
            record,
        });
    }

    /// Gives `targets` of task `t` to `relay_id`: extends the relay's open lease on the task, or
    /// opens a new one. Returns the index of the `task` command to deliver.
    pub fn grant(
        &mut self,
        t: usize,
        relay_id: &str,
        targets: Vec<String>,
        now: SystemTime,
    ) -> usize {
        let task = &self.db.p.tasks[t];
        let task_id = task.id.clone();
        let open = task
            .leases
            .iter()
            .position(|l| l.relay_id == relay_id && l.revoked_at.is_none());
        let first = task.leases.is_empty() && self.db.command(&task_id).is_none();
        let command_id = if first {
            task_id.clone()
        } else {
            format!("{task_id}~{}", uuid::Uuid::new_v4().simple())
        };
        let lease_s = task.lease_s;
        let mut spec: TaskSpec = task.spec.clone();
        spec.targets = targets.clone();
        let lease_id = match open {
            Some(i) => {
                let l = &mut self.db.p.tasks[t].leases[i];
                l.targets.extend(targets);
                l.lease_id.clone()
            }
            None => {
                self.db.p.tasks[t].leases.push(LeaseRecord {
                    lease_id: command_id.clone(),
                    relay_id: relay_id.to_owned(),
                    targets,
                    granted_at: now,
                    revoked_at: None,
                });
                command_id.clone()
            }
        };
        if self.db.p.tasks[t].relay_id.is_empty() {
            self.db.p.tasks[t].relay_id = relay_id.to_owned();
        }
        if lease_s.is_some() {
            spec.lease_s = lease_s;
            spec.lease_id = Some(lease_id);
        }
        if command_id != task_id {
            spec.task_id = Some(task_id);
        }
        let params = serde_json::to_value(&spec).unwrap_or_default();
        self.db.add_command(CommandRecord {
            id: command_id,
            relay_id: relay_id.to_owned(),
            name: TASK_COMMAND.to_owned(),
            params,
            state: CommandState::Queued,
            result: None,
            created_at: now,
        });
        self.db.p.commands.len() - 1
    }

    /// The leases `relay_id` holds on tasks that still have unfinished targets: what its
    /// heartbeat answers and its channel's `hello` list.
    pub fn leases_of(&self, relay_id: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (t, task) in self.db.p.tasks.iter().enumerate() {
            if task.lease_s.is_none() {
                continue;
            }
            let view = self.db.task_view(t);
            for l in &task.leases {
                if l.relay_id == relay_id
                    && l.revoked_at.is_none()
                    && l.targets.iter().any(|x| !view.has(x))
                {
                    out.push(l.lease_id.clone());
                }
            }
        }
        out
    }

    /// Takes back the leases of relays silent past `after` (no heartbeat, or the channel down)
    /// and gives their unfinished targets to live relays that can reach them; a target no other
    /// relay can reach goes back to the same relay under a new lease. Returns the commands to
    /// deliver.
    pub fn expire_leases(&mut self, now: SystemTime, after: Duration) -> Vec<usize> {
        let mut moves: Vec<(usize, usize, Vec<String>)> = Vec::new();
        for (t, task) in self.db.p.tasks.iter().enumerate() {
            if task.lease_s.is_none() {
                continue;
            }
            let view = self.db.task_view(t);
            for (i, l) in task.leases.iter().enumerate() {
                if l.revoked_at.is_some() || self.is(&l.relay_id, Liveness::Live, now, after) {
                    continue;
                }
                let open: Vec<String> =
                    l.targets.iter().filter(|x| !view.has(x)).cloned().collect();
                if !open.is_empty() {
                    moves.push((t, i, open));
                }
            }
        }
        let mut deliver = Vec::new();
        for (t, i, open) in moves {
            let relay = self.db.p.tasks[t].leases[i].relay_id.clone();
            let tenant = self
                .db
                .p
                .relays
                .get(&relay)
                .map(|r| r.tenant_id.clone())
                .unwrap_or_default();
            let mut plan = self.plan(&tenant, &open, Some(&relay), now, after);
            // Only live relays take over; targets nobody else can take stay with the relay.
            plan.by_relay
                .retain(|(r, _)| self.is(r, Liveness::Live, now, after));
            let moved: HashSet<&String> = plan.by_relay.iter().flat_map(|(_, v)| v).collect();
            if moved.is_empty() {
                continue;
            }
            let stay: Vec<String> = open
                .iter()
                .filter(|x| !moved.contains(x))
                .cloned()
                .collect();
            let count = moved.len();
            let task_id = self.db.p.tasks[t].id.clone();
            self.db.p.tasks[t].leases[i].revoked_at = Some(now);
            warn!(%task_id, from = %relay, targets = count, "relay silent past the lease: its unfinished targets move");
            self.db.p.stats.targets_moved += count as u64;
            for (to, targets) in plan.by_relay {
                deliver.push(self.grant(t, &to, targets, now));
            }
            if !stay.is_empty() {
                deliver.push(self.grant(t, &relay, stay, now));
            }
        }
        deliver
    }
}
