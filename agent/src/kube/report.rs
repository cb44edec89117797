//! Telling people about a pod: a log line, a JSON event on stdout, and a Kubernetes Event on
//! the pod (what `kubectl describe pod` shows). Posting runs in the background and never holds
//! up enrolment; a failed post is logged, nothing more.
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::{
    runtime::events::{Event, EventType, Recorder, Reporter},
    Resource,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

use super::decide::Problem;
use crate::events;

#[derive(Clone)]
pub struct Report {
    recorder: Recorder,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

impl Report {
    pub fn new(
        client: kube::Client,
        node: &str,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> Report {
        let reporter = Reporter {
            controller: "sockmesh".into(),
            instance: Some(format!("sockmesh-{node}")),
        };
        Report {
            recorder: Recorder::new(client, reporter),
            tasks,
            cancel,
        }
    }

    /// A malformed annotation, or one the operator does not allow: the pod falls back to
    /// defaults.
    pub fn problem(&self, pod: &Pod, name: &str, p: &Problem) {
        warn!(pod = %name, key = p.key, error = %p.message, "annotation refused; this pod uses the defaults");
        events::emit(serde_json::json!({
            "event": "pod_annotation_rejected", "pod": name, "key": p.key, "error": &p.message,
        }));
        self.post(
            pod,
            EventType::Warning,
            "InvalidAnnotation",
            format!(
                "sockmesh: annotation {}: {}; the pod is meshed with the default options",
                p.key, p.message
            ),
        );
    }

    /// The pod could not be enrolled (e.g. its loopback is down).
    pub fn enrol_failed(&self, pod: &Pod, name: &str, error: &anyhow::Error) {
        warn!(pod = %name, error = %format!("{error:#}"), "cannot enrol pod");
        events::emit(serde_json::json!({
            "event": "pod_enrol_failed", "pod": name, "error": format!("{error:#}"),
        }));
        self.post(
            pod,
            EventType::Warning,
            "MeshEnrolFailed",
            format!("sockmesh: cannot mesh this pod: {error:#}"),
        );
    }

    /// A DestinationRule the agent cannot apply whole: `malformed` (ignored) or fields L4
    /// cannot honour (the rest applies). Called once per resource version.
    pub fn rule_problem(
        &self,
        reference: ObjectReference,
        label: &str,
        malformed: bool,
        what: &str,
    ) {
        let (reason, note) = if malformed {
            warn!(rule = %label, error = %what, "DestinationRule ignored: malformed");
            (
                "InvalidDestinationRule",
                format!("sockmesh: this DestinationRule is ignored at L4: {what}"),
            )
        } else {
            warn!(rule = %label, fields = %what, "DestinationRule fields not enforced at L4 (the rest applies)");
            (
                "UnsupportedDestinationRuleFields",
                format!("sockmesh: not enforced at L4 (the rest of the rule applies): {what}"),
            )
        };
        events::emit(serde_json::json!({
            "event": if malformed { "destination_rule_rejected" } else { "destination_rule_unsupported" },
            "rule": label, "detail": what,
        }));
        self.publish(reference, EventType::Warning, reason, note, "Apply");
    }

    fn post(&self, pod: &Pod, type_: EventType, reason: &str, note: String) {
        self.publish(pod.object_ref(&()), type_, reason, note, "Enrol");
    }

    fn publish(
        &self,
        reference: ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
        action: &str,
    ) {
        let recorder = self.recorder.clone();
        let cancel = self.cancel.clone();
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        self.tasks.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = recorder.publish(&ev, &reference) => match r {
                    Ok(()) => debug!(reason = %ev.reason, "kubernetes event posted"),
                    Err(e) => warn!(error = %e, "could not post a kubernetes event"),
                },
            }
        });
    }
}
