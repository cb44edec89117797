//! The watch on Istio DestinationRules (`networking.istio.io`), every namespace: each object
//! is parsed (`rules::istio::parse`) into the live set the policy reads. A malformed rule is
//! ignored and what L4 cannot honour is named; either way one log line and one Warning Event
//! on the rule per resource version, never a silent drop.
//!
//! The version watched is `v1` (Istio 1.22 on), else `v1beta1` (every Istio still serves it;
//! both are views of the same objects). A cluster without Istio has neither: that is logged
//! once, not an error, and the watch looks again every [`ABSENT_RETRY`] so installing Istio
//! later needs no restart.
use std::{collections::HashSet, pin::Pin, time::Duration};

use futures_util::{Stream, StreamExt};
use kube::{
    api::{ApiResource, DynamicObject},
    runtime::{watcher, WatchStreamExt},
    Api, Client, Resource,
};
use tracing::{info, warn};

use super::{
    identity::{step, Change},
    report::Report,
};
use crate::rules::istio::{
    parse::{parse, DestinationRule},
    DestinationRules,
};

/// How long to wait before looking for the CRD again when neither version is served.
pub const ABSENT_RETRY: Duration = Duration::from_secs(30);

const VERSIONS: [&str; 2] = ["v1", "v1beta1"];

type Watch =
    Pin<Box<dyn Stream<Item = Result<watcher::Event<DynamicObject>, watcher::Error>> + Send>>;

/// One item of the watch.
pub type RuleInput = Box<Result<watcher::Event<DynamicObject>, watcher::Error>>;

fn resource(version: &str) -> ApiResource {
    ApiResource {
        group: "networking.istio.io".into(),
        version: version.into(),
        api_version: format!("networking.istio.io/{version}"),
        kind: "DestinationRule".into(),
        plural: "destinationrules".into(),
    }
}

/// The HTTP status of a list or watch that the API server refused.
fn refused(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => Some(s.code),
        _ => None,
    }
}

pub struct RuleWatch {
    client: Client,
    drs: DestinationRules,
    report: Report,
    version: usize,
    stream: Watch,
    /// While neither version is served: when to look again.
    retry_at: Option<tokio::time::Instant>,
    /// The CRD missing (or reading it forbidden) was said: once until it is listed again.
    absent_logged: bool,
    relist: Option<Vec<DestinationRule>>,
    /// (namespace, name, resourceVersion) already reported.
    reported: HashSet<(String, String, String)>,
}

impl RuleWatch {
    pub fn new(client: &Client, drs: DestinationRules, report: Report) -> RuleWatch {
        RuleWatch {
            stream: Self::watch(client, 0),
            client: client.clone(),
            drs,
            report,
            version: 0,
            retry_at: None,
            absent_logged: false,
            relist: None,
            reported: HashSet::new(),
        }
    }

    fn watch(client: &Client, version: usize) -> Watch {
        let ar = resource(VERSIONS[version]);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed()
    }

    /// The next event (never ends). Cancel-safe: the wait for a retry is a deadline, and the
    /// stream keeps its place between polls.
    pub async fn next(&mut self) -> RuleInput {
        if let Some(t) = self.retry_at {
            tokio::time::sleep_until(t).await;
            self.retry_at = None;
            self.stream = Self::watch(&self.client, self.version);
        }
        match self.stream.next().await {
            Some(e) => Box::new(e),
            None => std::future::pending().await,
        }
    }

    pub fn handle(&mut self, input: RuleInput) {
        let ev = match *input {
            Ok(ev) => ev,
            Err(e) if refused(&e) == Some(404) => return self.missing(),
            Err(e) if refused(&e) == Some(403) => return self.forbidden(&e),
            Err(e) => {
                warn!(error = %e, "DestinationRule watch failed; retrying with backoff (the rules in force stay)");
                return;
            }
        };
        let mut relist = self.relist.take();
        let c = step(ev, &mut relist, |o| self.convert(o));
        self.relist = relist;
        match c {
            Change::Nothing => {}
            Change::Apply(r) => self.drs.apply(r),
            Change::Delete(ns, name) => self.drs.delete(&ns, &name),
            Change::Replace(all) => {
                self.absent_logged = false;
                let n = all.len();
                self.drs.replace(all);
                info!(
                    rules = n,
                    version = VERSIONS[self.version],
                    "Istio DestinationRules listed"
                );
                crate::events::emit(serde_json::json!({
                    "event": "destination_rules_synced", "rules": n, "version": VERSIONS[self.version],
                }));
            }
        }
    }

    /// This version is not served: try the other; neither: say so once, look again later.
    fn missing(&mut self) {
        self.version = (self.version + 1) % VERSIONS.len();
        if self.version == 0 {
            if !self.absent_logged {
                self.absent_logged = true;
                info!(
                    retry_s = ABSENT_RETRY.as_secs(),
                    "no Istio DestinationRule CRD (networking.istio.io v1 or v1beta1) in this cluster; none applied, looking again periodically"
                );
                crate::events::emit(serde_json::json!({"event": "destination_rules_absent"}));
            }
            // Whatever was listed before the CRD went is gone with it.
            if !self.drs.is_empty() {
                self.drs.replace(Vec::new());
            }
            self.retry_at = Some(tokio::time::Instant::now() + ABSENT_RETRY);
            return;
        }
        self.stream = Self::watch(&self.client, self.version);
    }

    /// Not allowed to read them (a ClusterRole from before DestinationRules): say how to fix
    /// it, once, and look again later rather than every backoff step.
    fn forbidden(&mut self, e: &watcher::Error) {
        if !self.absent_logged {
            self.absent_logged = true;
            warn!(error = %e, "not allowed to list Istio DestinationRules: grant list and watch on networking.istio.io destinationrules to the agent's ClusterRole (deploy/sockmesh.yaml has it); none applied meanwhile");
            crate::events::emit(serde_json::json!({"event": "destination_rules_forbidden"}));
        }
        self.retry_at = Some(tokio::time::Instant::now() + ABSENT_RETRY);
    }

    /// The rule in an object, reporting (once per resource version) what is wrong with it.
    fn convert(&mut self, o: &DynamicObject) -> Option<DestinationRule> {
        let value = serde_json::to_value(o).ok()?;
        let parsed = parse(&value);
        let m = o.meta();
        let (ns, name) = (
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        );
        let rv = m.resource_version.clone().unwrap_or_default();
        let fresh = self.reported.insert((ns.clone(), name.clone(), rv));
        if self.reported.len() > 10_000 {
            // Bounded: forgetting only means a rule may be reported once more.
            self.reported.clear();
        }
        let label = format!("{ns}/{name}");
        let reference = || o.object_ref(&resource(VERSIONS[self.version]));
        match parsed {
            Err(why) => {
                if fresh {
                    self.report.rule_problem(reference(), &label, true, &why);
                }
                None
            }
            Ok(p) => {
                if fresh && !p.unsupported.is_empty() {
                    let what = p.unsupported.join(", ");
                    self.report.rule_problem(reference(), &label, false, &what);
                }
                Some(p.rule)
            }
        }
    }
}
