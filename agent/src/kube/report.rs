//! Telling people about a pod: a log line, a JSON event on stdout, and a Kubernetes Event on
//! the pod (what `kubectl describe pod` shows). Posting runs in the background and never holds
//! up enrolment; a failed post is logged, nothing more.
use k8s_openapi::api::core::v1::Pod;
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

    fn post(&self, pod: &Pod, type_: EventType, reason: &str, note: String) {
        let reference = pod.object_ref(&());
        let recorder = self.recorder.clone();
        let cancel = self.cancel.clone();
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Enrol".into(),
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
