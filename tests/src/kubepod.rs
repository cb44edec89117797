//! A test pod as Kubernetes would have it: a network namespace with a process in a cgroup
//! named the way the kubelet names it (so the agent finds the namespace through its real
//! resolver: pod UID in /proc/*/cgroup -> /proc/PID/ns/net), and the Pod object the fake API
//! server serves.

use std::net::SocketAddr;

use crate::kubeapi::FakePod;
use crate::kubelet::{new_uid, Driver, KubeletPod};
use crate::pod::{Cluster, Pod};
use crate::process::Proc;

pub struct KubePod {
    pub pod: Pod,
    pub procs: Vec<Proc>,
    pub cgroup: KubeletPod,
    pub obj: FakePod,
}

impl KubePod {
    /// Pod `label` of `cluster`, in Kubernetes namespace `ns` on `node`, with one container.
    /// Panics if the machine cannot make it (a test helper: there is nothing to recover).
    pub fn new(cluster: &Cluster, label: &str, ns: &str, node: &str, driver: Driver) -> KubePod {
        let pod = cluster.add_pod(label).expect("pod");
        let cgroup = KubeletPod::new(&new_uid(), driver).expect("kubelet cgroup");
        // Its real address, so the agent can tell who it is as a peer.
        let obj = FakePod::new(ns, label, &cgroup.uid, node).with_ip(&pod.ip4().to_string());
        let mut kp = KubePod {
            pod,
            procs: vec![],
            cgroup,
            obj,
        };
        kp.start_container();
        kp
    }

    /// Another "container": a process in the pod's namespace and in a new container cgroup.
    pub fn start_container(&mut self) -> u32 {
        let p = self.pod.spawn(&["sleep", "1000"]).expect("sleep in pod");
        let pid = p.pid();
        self.cgroup.container(pid).expect("into the pod cgroup");
        self.procs.push(p);
        pid
    }

    pub fn uid(&self) -> &str {
        &self.cgroup.uid
    }
}

/// What kube-proxy does for `client`: connections to `cluster_ip:port` go to `to`, by a DNAT
/// in the client pod's own namespace (iptables nat OUTPUT there, gone with the namespace; the
/// host's tables are never touched). Replaces any earlier one. Panics if iptables fails.
pub fn route_cluster_ip(client: &Pod, cluster_ip: &str, port: u16, to: SocketAddr) {
    client
        .ip(&["route", "replace", "10.96.0.0/16", "dev", "eth0"])
        .expect("route the service range");
    let ipt = |args: &[&str]| {
        let out = client
            .command("iptables")
            .args(args)
            .output()
            .expect("iptables");
        assert!(out.status.success(), "iptables {args:?}: {out:?}");
    };
    ipt(&["-t", "nat", "-F", "OUTPUT"]);
    let (port, to) = (port.to_string(), to.to_string());
    ipt(&[
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        cluster_ip,
        "-p",
        "tcp",
        "--dport",
        &port,
        "-j",
        "DNAT",
        "--to-destination",
        &to,
    ]);
}
