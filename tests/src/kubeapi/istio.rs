//! Istio's DestinationRule CRD on the fake API server: installed (which versions are
//! served), its objects, and a ClusterRole that does not grant them (403: `route_rules` in
//! the parent module answers the requests).

use serde_json::{json, Value};

use super::{FakeKubeApi, Kind};

impl FakeKubeApi {
    /// Installs Istio's DestinationRule CRD, serving these versions (`["v1", "v1beta1"]`
    /// for Istio 1.22 on, `["v1beta1"]` before).
    pub fn install_istio(&self, versions: &[&str]) {
        self.shared.lock().istio_versions = versions.iter().map(|v| v.to_string()).collect();
    }

    /// DestinationRule requests are refused with 403, as for an agent whose ClusterRole
    /// predates them.
    pub fn forbid_istio(&self) {
        self.shared.lock().istio_forbidden = true;
    }

    /// Adds or replaces a DestinationRule (`metadata.namespace` and `.name` set).
    pub fn put_destination_rule(&self, rule: &Value) {
        let key = format!(
            "{}/{}",
            rule["metadata"]["namespace"].as_str().unwrap_or(""),
            rule["metadata"]["name"].as_str().unwrap_or("")
        );
        let exists = self.shared.lock().rules.contains_key(&key);
        let mut obj = rule.clone();
        obj["apiVersion"] = json!("networking.istio.io/v1");
        obj["kind"] = json!("DestinationRule");
        if obj["metadata"]["creationTimestamp"].is_null() {
            obj["metadata"]["creationTimestamp"] = json!("2024-01-01T00:00:00Z");
        }
        self.record(Kind::Rule, if exists { "MODIFIED" } else { "ADDED" }, obj);
    }

    pub fn delete_destination_rule(&self, namespace: &str, name: &str) {
        let key = format!("{namespace}/{name}");
        let obj = self.shared.lock().rules.get(&key).cloned();
        if let Some(obj) = obj {
            self.record(Kind::Rule, "DELETED", obj);
        }
    }
}
