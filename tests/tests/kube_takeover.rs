//! `run --kube --takeover`: the successor serves the pods the Kubernetes API lists on its
//! node, on the old agent's sockets, and drops the ones the old agent had that the API no
//! longer lists. Two fake API servers play "before" and "after": the old agent watches one
//! that lists both pods, the successor one that lists only the pod still on the node.
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{counter, redirected, T};
use sockmesh_tests::kubepod::KubePod;
use sockmesh_tests::names::unique_name;
use sockmesh_tests::*;

const KT: Duration = Duration::from_secs(60);
const MESH: &str = "sockmesh.io/mesh";

fn kube_args<'a>(api: &'a str, node: &'a str) -> Vec<&'a str> {
    vec![
        "--kube",
        "--kube-api",
        api,
        "--node-name",
        node,
        "--takeover=if-running",
        // Proxy tier: tells which agent serves a pod by its connections reaching it.
        "--fast-path=off",
    ]
}

#[test]
fn a_kube_successor_serves_the_listed_pods_and_drops_the_others() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let server_pod = cluster.add_pod("server").expect("pod");
    let _server =
        TcpServer::start(&server_pod, SocketAddr::from(([0, 0, 0, 0], 8080))).expect("echo server");
    let dst = server_pod.addr4(8080);
    let node = unique_name();
    let (before, after) = (
        FakeKubeApi::start().expect("api"),
        FakeKubeApi::start().expect("api"),
    );
    let stays = KubePod::new(&cluster, "stays", "shop", &node, Driver::Systemd);
    let goes = KubePod::new(&cluster, "goes", "shop", &node, Driver::Systemd);
    for api in [&before, &after] {
        api.add_namespace("shop", &[(MESH, "enabled")]);
        api.add_pod(&stays.obj);
    }
    before.add_pod(&goes.obj);
    // A server in the pod that goes: steered to the agent while enrolled, reached directly after.
    let _goes_app = TcpServer::start(&goes.pod, SocketAddr::from(([0, 0, 0, 0], 9090)))
        .expect("server in the pod that goes");
    let goes_dst = goes.pod.addr4(9090);
    let reach_goes = || {
        let mut c = tcp_connect(&server_pod, goes_dst, T).expect("connect in");
        tcp_echo_roundtrip(&mut c.stream, b"in").expect("echo in");
    };

    // The first agent on the node: nothing to take over, it starts afresh.
    let (url_before, url_after) = (before.url(), after.url());
    let mut old = Agent::start(kube_args(&url_before, &node)).expect("old agent");
    let ready = old.wait_ready().expect("ready");
    assert!(ready["took_over_from"].is_null(), "{ready}");
    for p in [&stays, &goes] {
        old.wait_event(|v| v["event"] == "pod_enrolled" && v["id"] == p.uid(), KT)
            .unwrap_or_else(|e| panic!("{} never enrolled: {e:#}", p.obj.name));
    }
    assert!(redirected(&stays.pod, dst) && redirected(&goes.pod, dst));
    old.wait_event(
        |v| v["event"] == "inbound_listening" && v["port"] == 9090,
        T,
    )
    .expect("the server in the pod that goes is captured");
    reach_goes();
    let steered = counter(&old, &goes.pod, "inbound_steered");
    assert!(steered >= 1, "steered to the old agent: {steered}");

    let new = Agent::start_in(old.bpffs(), kube_args(&url_after, &node)).expect("new agent");
    let ready = new.wait_ready().expect("new agent ready");
    assert_eq!(
        ready["took_over_from"].as_u64(),
        Some(u64::from(old.pid())),
        "{ready}"
    );
    // Listed before it was ready, on the old agent's sockets.
    new.wait_event(
        |v| v["event"] == "pod_enrolled" && v["id"] == stays.uid(),
        T,
    )
    .expect("the listed pod is served");
    assert!(
        !new.events()
            .iter()
            .any(|v| v["event"] == "pod_enrolled" && v["id"] == goes.uid()),
        "a pod the API no longer lists is not enrolled"
    );
    assert!(
        new.stderr()
            .contains("closed the handed-over sockets of pods this agent does not enrol"),
        "{}",
        new.stderr()
    );
    // From the moment the successor is ready: the listed pod captured, the other direct.
    assert!(redirected(&stays.pod, dst), "the listed pod is captured");
    assert!(!redirected(&goes.pod, dst), "the dropped pod goes direct");
    reach_goes();
    assert_eq!(
        counter(&new, &goes.pod, "inbound_steered"),
        steered,
        "the dropped pod's server is reached directly, not steered"
    );

    old.wait_event_named("handed_over", T)
        .expect("the old agent hands over");
    old.wait_event_named("idle", T * 2)
        .expect("it drains and waits for SIGTERM instead of exiting");
    assert!(
        old.is_running(),
        "an if-running agent stays after handing over"
    );
    let status = old.stop().expect("stops on SIGTERM");
    assert!(status.success(), "{status}");
    assert!(
        new.bpffs_dir().join("SM_PODS").exists(),
        "the old agent's exit leaves the pins"
    );
    assert!(
        redirected(&stays.pod, dst),
        "still captured by the new agent"
    );
    assert!(!redirected(&goes.pod, dst), "still direct");
}
