//! The shipped DaemonSet, run for real: the image built from the repository's `Dockerfile`
//! with podman (on a Debian base made here with mmdebstrap, no registry), run by runc with an
//! OCI spec generated from `deploy/sockmesh.yaml`'s pod template (args, env with the
//! `fieldRef`s filled in, capabilities, read-only root, user, hostPID, hostNetwork, every
//! volume and mount), talking HTTPS to the fake API server through in-cluster configuration
//! (service-account token and CA mounted where the kubelet mounts them,
//! `KUBERNETES_SERVICE_HOST`/`PORT`), meshing labelled test pods.
//!
//! What differs from a node, and why (each decided in one place):
//! - runc runs the container, not a kubelet and containerd: there is no cluster here, and
//!   podman cannot run it (it always sets rlimits, which this sandbox forbids);
//! - the spec sets no rlimits ([`sockmesh_tests::ocispec`]): root here lacks CAP_SYS_RESOURCE,
//!   so a container cannot be given any, and the agent runs with this machine's (hard open
//!   files 20000);
//! - the node's host paths ([`sockmesh_tests::node::Node::host_path`]): its bpffs and its other
//!   directories are private to the test, and `/sys/fs/cgroup` is this machine's cgroup2 mount
//!   (`/sys/fs/cgroup/unified`, a hybrid hierarchy);
//! - the node's address is a loopback one (127.x.y.z) and the API server listens on
//!   127.0.0.1, not on a Service IP: traffic stays on this machine;
//! - the kubelet's /etc/hosts, /etc/resolv.conf and /dev/termination-log are not mounted (the
//!   agent reads none of them), and the pod has no pause container (hostNetwork and hostPID
//!   leave it nothing to hold).
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::T;
use sockmesh_tests::caps;
use sockmesh_tests::daemonset::{build_image, host_path, DaemonSetPod};
use sockmesh_tests::kubepod::KubePod;
use sockmesh_tests::manifest::{repo_manifest_path, Manifest};
use sockmesh_tests::node::{project, Node};
use sockmesh_tests::prom::http_get;
use sockmesh_tests::*;

const MESH: &str = "sockmesh.io/mesh";
/// Enrolment goes through the API server's list and watch.
const KT: Duration = Duration::from_secs(60);
const GREETING: &str = "hello from port 80";

/// nginx in `pod` answering [`GREETING`] on port 80 (IPv4 and IPv6 wildcards), its files in
/// `dir`.
fn nginx(pod: &Pod, dir: &Path) -> Proc {
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log stderr warn;\nevents {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         server {{\n    listen 80;\n    listen [::]:80 ipv6only=on;\n    \
         location / {{ default_type text/plain; return 200 \"{GREETING}\\n\"; }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("nginx.conf");
    let (p, c) = (dir.to_string_lossy(), path.to_string_lossy());
    pod.spawn(&["nginx", "-e", "stderr", "-p", &p, "-c", &c])
        .expect("nginx")
}

/// `curl http://ADDR/` from `pod`: the body.
fn curl(pod: &Pod, dst: SocketAddr) -> anyhow::Result<String> {
    pod.exec(&[
        "curl",
        "-sS",
        "-g",
        "--max-time",
        "5",
        &format!("http://{dst}/"),
    ])
}

/// Polls `f` until it holds or `timeout` passes.
fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_daemonset_as_shipped_meshes_labelled_pods_and_serves_port_80() {
    require_root();
    let manifest = Manifest::load(&repo_manifest_path()).expect("deploy/sockmesh.yaml");
    let image = build_image(&manifest).expect("the image, from the Dockerfile");

    let node = Node::new().expect("node");
    let api = FakeKubeApi::start_https().expect("fake API server");
    let cluster = Cluster::new().expect("cluster");
    api.add_namespace("shop", &[(MESH, "enabled")]);
    api.add_namespace("plain", &[]);
    let client = KubePod::new(&cluster, "client", "shop", &node.name, Driver::Systemd);
    let web = KubePod::new(&cluster, "web", "shop", &node.name, Driver::Cgroupfs);
    let outsider = KubePod::new(&cluster, "outsider", "plain", &node.name, Driver::Systemd);
    for p in [&client, &web, &outsider] {
        api.add_pod(&p.obj);
    }

    let mut ds = DaemonSetPod::start(&node, &manifest, &image, &api).expect("start the pod");
    let agent = ds.container.agent();
    agent
        .wait_ready()
        .expect("the agent starts in the container");
    for p in [&client, &web] {
        agent
            .wait_event(|v| v["event"] == "pod_enrolled" && v["id"] == p.uid(), KT)
            .unwrap_or_else(|e| panic!("{} never enrolled: {e:#}", p.obj.name));
    }
    agent.wait_event_named("kube_synced", KT).expect("synced");
    assert!(
        !agent
            .events()
            .iter()
            .any(|v| v["event"] == "pod_enrolled" && v["id"] == outsider.uid()),
        "a pod of an unlabelled namespace is not meshed"
    );
    assert_eq!(api.unauthorized(), 0, "every request carried the token");

    // The kubelet's readiness and liveness probes, as the manifest writes them.
    let c = manifest.container().expect("container");
    for (what, probe) in [
        ("readiness", &c.readiness_probe),
        ("liveness", &c.liveness_probe),
    ] {
        let probe = probe.as_ref().unwrap_or_else(|| panic!("no {what} probe"));
        let (addr, url_path) = ds.probe_target(&manifest, probe).expect("probe target");
        let mut last = None;
        let ok = eventually(T, || {
            last = Some(http_get(addr, &url_path).map(|(code, _)| code));
            matches!(last, Some(Ok(200)))
        });
        assert!(ok, "{what} probe GET {addr}{url_path}: {last:?}");
    }

    // Exactly the capabilities the manifest grants, each one kept by the agent: a granted one
    // it drops at start would be privilege for nothing.
    let granted: BTreeSet<String> = ds.spec["process"]["capabilities"]["effective"]
        .as_array()
        .expect("caps")
        .iter()
        .map(|c| c.as_str().expect("name").to_string())
        .collect();
    let pid = ds.container.pid().expect("container pid").to_string();
    let held = caps::of_process(&pid, "CapEff").expect("the agent's capabilities");
    let held: BTreeSet<String> = caps::cap_names(held).into_iter().collect();
    assert_eq!(held, granted, "the agent's capabilities vs the manifest's");

    // An app on port 80 in an enrolled pod: its wildcard bind is moved to loopback and the
    // agent opens the pod's address on port 80, which takes CAP_NET_BIND_SERVICE.
    let _nginx = nginx(&web.pod, cluster.tmp());
    agent
        .wait_event(|v| v["event"] == "inbound_listening" && v["port"] == 80, T)
        .expect("the agent listens on port 80 in the web pod");
    let web80 = web.pod.addr4(80);
    assert!(
        wait_tcp_listening(&web.pod, web80, T).is_ok(),
        "the agent's listener on {web80}"
    );
    let body = curl(&outsider.pod, web80).expect("an unmeshed pod reaches web:80");
    assert_eq!(body.trim(), GREETING);
    let body = curl(&outsider.pod, web.pod.addr6(80)).expect("over IPv6 too");
    assert_eq!(body.trim(), GREETING);
    // A meshed client: out through its own pod's agent listener, in through web's.
    let body = curl(&client.pod, web80).expect("a meshed pod reaches web:80");
    assert_eq!(body.trim(), GREETING);
    // As shipped (`--fast-path=auto`): curl's connection was proxied, and its upstream
    // connect handed the peer to the kernel tier, so this one goes direct, policed in
    // connect() and counted as the peer's (`direct`).
    let mut conn = tcp_connect(&client.pod, web80, T).expect("connect");
    assert!(
        !conn.local.ip().is_loopback(),
        "the client's second connection goes direct on the kernel tier"
    );
    // A whole exchange before it closes: the agent has connected upstream (and counted the
    // connection) by the time the answer arrives, however loaded the machine is.
    conn.stream
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .expect("request");
    let mut answer = String::new();
    conn.stream.read_to_string(&mut answer).expect("answer");
    assert!(answer.contains(GREETING), "{answer}");
    drop(conn);

    // The node address serves the probes and nothing else: every pod's peers and bytes are
    // not published there (/metrics is where the operator chooses, nowhere by default).
    let probe = c.readiness_probe.as_ref().expect("readiness probe");
    let (node_http, _) = ds.probe_target(&manifest, probe).expect("the probes' port");
    let (status, _) = http_get(node_http, "/metrics").expect("GET /metrics");
    assert_eq!(status, 404, "/metrics on the node address");
    // Counted by the agent, in the pinned maps `sockmesh peers` reads.
    let peer = web80.to_string();
    let counted = |peers: &serde_json::Value| {
        let rows = peers["peers"].as_array().cloned().unwrap_or_default();
        let out = rows.iter().any(|r| {
            r["pod"] == "shop/client"
                && r["peer"] == peer.as_str()
                && r["conns_total"].as_u64() >= Some(2)
        });
        let inbound = rows.iter().any(|r| {
            r["pod"] == "shop/web"
                && r["direction"] == "inbound"
                && r["conns_total"].as_u64() >= Some(1)
        });
        (out, inbound)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let peers = loop {
        let peers = agent.read_json("peers", &[]).expect("sockmesh peers");
        if counted(&peers) == (true, true) || Instant::now() > deadline {
            break peers;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (out, inbound) = counted(&peers);
    assert!(
        out,
        "the client's connections to {peer} are counted: {peers}"
    );
    assert!(
        inbound,
        "the inbound connections to web are counted: {peers}"
    );
    let stats = agent.stats().expect("the pins are on the node's bpffs");
    assert!(
        stats["pods"].as_array().is_some_and(|p| p.len() >= 2),
        "{stats}"
    );

    // A ConfigMap edit reaches the agent the way the kubelet delivers it: a new `..data` swapped
    // into the volume, which the container sees through its read-only mount.
    let (vol, cm) = manifest
        .pod()
        .volumes
        .iter()
        .find_map(|v| v.config_map.as_ref().map(|cm| (v, cm)))
        .expect("the policy ConfigMap's volume");
    let mount = c.volume_mounts.iter().find(|m| m.name == vol.name);
    let dir = host_path(&ds.spec, &mount.expect("mounted").mount_path).expect("its source");
    let edited: BTreeMap<String, Vec<u8>> = manifest
        .config_map(&cm.name)
        .expect("in the manifest")
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                format!("{v}\n# edited by the test\n").into_bytes(),
            )
        })
        .collect();
    project(&dir, &edited, cm.default_mode.unwrap_or(0o644)).expect("the kubelet's update");
    agent
        .wait_event_named("policy_reloaded", T)
        .expect("the edited policy is loaded");

    // The container's stderr is the pod's log (`kubectl logs`): plain text, no colour codes.
    let log = agent.stderr();
    assert!(log.contains(" INFO "), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in the pod log:\n{log}"
    );

    // The kubelet stops the pod: SIGTERM, drain, exit 0 within the grace period, pins gone.
    let status = ds
        .container
        .stop(DaemonSetPod::grace(&manifest))
        .expect("stops");
    assert!(
        status.success(),
        "exit status {status}\n{}",
        ds.container.agent().stderr()
    );
    let pins = ds.container.agent().bpffs_dir().to_path_buf();
    assert!(!is_populated(&pins), "{} left behind", pins.display());
}

fn is_populated(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}
