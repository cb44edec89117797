//! Peers by name without Kubernetes: the pods the agent enrolled are known by their
//! addresses (workload: the netns name), and `--peer-names` names address blocks. Policy
//! rules by name apply to real connections, `sockmesh peers` shows the names, and a bad names
//! file is one error naming the file, line and fix. Real kernel, real pods and sockets.
//!
//! Tier: the default (`--fast-path auto`); names and rules are resolved on each peer's first,
//! proxied connection, and the kernel tier counts into the same rows.
mod common;
mod policy_util;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use policy_util::{attempt, Outcome};
use sockmesh_tests::*;

const POLICY: &str = "\
[[rule]]
service = \"db.shop\"
max_conns = 1
queue = 0

[[rule]]
peer_workload = \"*-server\"
max_conns = 1
queue = 0
";

/// A connection through the agent, retried while the slot of the previous one (dropped a
/// moment ago) is not freed yet.
fn admit(client: &Pod, dst: SocketAddr) -> Connected {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match attempt(client, dst) {
            Outcome::Admitted(c) => return c,
            other if Instant::now() > deadline => panic!("{dst}: {other:?} for 10 s"),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// One connection held, then whether a second one is reset (`max_conns = 1` applies).
fn limited(client: &Pod, dst: SocketAddr) -> bool {
    let held = admit(client, dst);
    let second = attempt(client, dst);
    drop(held);
    match second {
        Outcome::Admitted(_) => false,
        Outcome::Reset => true,
        other => panic!("{dst}: {other:?}"),
    }
}

#[test]
fn enrolled_pods_and_named_blocks_are_peers_by_name_for_rules_and_peers() {
    let (cluster, client, server_pod, _server) = common::client_and_echo_server();
    let db = cluster.add_pod("db").expect("db pod");
    let _db = TcpServer::start(&db, "0.0.0.0:5432".parse().expect("addr")).expect("echo");
    let other = cluster.add_pod("other").expect("other pod");
    let _other = TcpServer::start(&other, "0.0.0.0:8080".parse().expect("addr")).expect("echo");
    let dir = TempDir::new().expect("tempdir");
    let names = dir.path().join("names.toml");
    std::fs::write(
        &names,
        format!(
            "[[name]]\ncidr = \"{}/32\"\nservice = \"db.shop\"\nworkload = \"postgres\"\n",
            db.ip4()
        ),
    )
    .expect("names");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).expect("policy");
    let agent = Agent::start([
        "--pod",
        &pod_spec(&client, ""),
        "--pod",
        &pod_spec(&server_pod, ""),
        "--peer-names",
        &names.display().to_string(),
        "--policy",
        &policy.display().to_string(),
        "--breaker-failures",
        "off",
        "--adaptive-k",
        "off",
    ])
    .expect("agent");
    agent.wait_ready().expect("ready");

    let db_addr = db.addr4(5432);
    let server = server_pod.addr4(common::ECHO_PORT);
    assert!(
        limited(&client, db_addr),
        "service = db.shop: the named block"
    );
    assert!(
        limited(&client, server),
        "peer_workload: an enrolled pod, by its netns name"
    );
    assert!(
        !limited(&client, other.addr4(8080)),
        "an unnamed, unenrolled pod"
    );

    let client_name = client.netns_path().display().to_string();
    let db_s = db_addr.to_string();
    let server_s = server.to_string();
    let peers = common::peers_until(&agent, &["--pod", &client_name], |v| {
        common::find_peer(v, &db_s).is_some_and(|r| r["service"] == "db.shop")
            && common::find_peer(v, &server_s).is_some_and(|r| !r["workload"].is_null())
    });
    let row = common::peer_row(&peers, &db_s);
    assert_eq!(row["service"], "db.shop", "{row}");
    assert_eq!(row["workload"], "postgres", "{row}");
    assert_eq!(row["namespace"], "shop", "from the service's name: {row}");
    assert_eq!(row["pod_workload"], client.name(), "{row}");
    let row = common::peer_row(&peers, &server_s);
    assert_eq!(row["workload"], server_pod.name(), "{row}");
    assert!(
        row["namespace"].is_null(),
        "no namespace without the API: {row}"
    );
    let dir = agent.bpffs_dir().display().to_string();
    let (status, table, err) = Agent::run_to_exit([
        "peers",
        "--bpffs-dir",
        &dir,
        "--pod",
        &client_name,
        "--by",
        "workload",
    ])
    .expect("peers table");
    assert!(status.success(), "{err}");
    assert!(
        table.contains("SERVICE") && table.contains("WORKLOAD"),
        "{table}"
    );
    assert!(
        table.contains("db.shop") && table.contains("shop/postgres"),
        "{table}"
    );
}

#[test]
fn a_bad_names_file_is_one_error_naming_file_line_and_fix() {
    require_root();
    let dir = TempDir::new().expect("tempdir");
    let names = dir.path().join("names.toml");
    std::fs::write(
        &names,
        "[[name]]\ncidr = \"10.0.5.0/24\"\nservice = \"db\"\n",
    )
    .expect("write");
    let bpffs = BpfFsDir::new().expect("bpffs");
    let pins = bpffs.path().join("sockmesh");
    let names_s = names.display().to_string();
    let (status, stdout, stderr) = Agent::run_to_exit([
        "run",
        "--bpffs-dir",
        &pins.display().to_string(),
        "--peer-names",
        &names_s,
    ])
    .expect("run");
    assert!(!status.success(), "refused");
    assert!(stdout.trim().is_empty(), "nothing started: {stdout}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("sockmesh: error:"))
        .unwrap_or_else(|| panic!("one error line: {stderr}"));
    assert!(
        line.contains(&format!("{names_s}:3:11: name #1: service = \"db\"")),
        "{line}"
    );
    assert!(line.contains("NAME.NAMESPACE"), "{line}");
    assert!(!pins.exists(), "nothing pinned");
}
