//! The benchmark's private network: the integration tests' [`Cluster`] (a switch namespace
//! with a bridge, pods on veths) on subnets of its own, with one server pod and one client pod
//! per variant, and per agent a meshed server pod for the inbound workload; then the servers,
//! the agents, the iptables rule and HAProxy. Names come from the
//! cluster (`smt-<pid>-<n>-<rand>-...`, unique per run; `smt-sweep` removes those of a killed
//! run), and every piece is a guard, removed when `Topology` drops (error and Ctrl-C included).

use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use sockmesh_tests::{Cluster, Pod};

use super::plan::Variant;
use crate::demo::{spawn_agent_until_ready, wait_until, DirGuard};
use crate::util::{describe, output, ChildGuard};

/// The bench's subnets: 10.79.0.0/24 and fd79::/64, apart from the tests' 10.77 and fd77.
const SUBNET4: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 0);
const SUBNET6: Ipv6Addr = Ipv6Addr::new(0xfd79, 0, 0, 0, 0, 0, 0, 0);
/// The server pod's host number; client pods are 20, 21, ... in `Variant::ALL`'s order.
const SERVER_HOST: u8 = 11;
/// The meshed server pods of the inbound workload, each enrolled by its variant's agent.
const INBOUND_SERVERS: [(Variant, u8); 3] = [
    (Variant::Sockmesh, 12),
    (Variant::SockmeshSplice, 13),
    (Variant::Baseline, 14),
];
const FIRST_CLIENT_HOST: u8 = 20;
pub const SERVER_V4: &str = "10.79.0.11";
pub const SERVER_V6: &str = "fd79::11";
pub const IPERF_PORT: u16 = 5201;
pub const SOCKPERF_PORT: u16 = 11111;
pub const HTTP_PORT: u16 = 80;
/// The agent's default outbound port and SO_MARK (what the iptables rule uses).
const OUTBOUND_PORT: u16 = 15001;
const AGENT_MARK: &str = "0x534d";

/// Fields drop in declaration order: processes before the pins and namespaces they use.
pub struct Topology {
    pub agent: ChildGuard,
    splice_agent: ChildGuard,
    proxy_agent: ChildGuard,
    baseline_agent: Option<ChildGuard>,
    haproxy: ChildGuard,
    _servers: Vec<ChildGuard>,
    /// The inbound workload's servers (nginx in each meshed server pod with an agent).
    _inbound_servers: Vec<ChildGuard>,
    inbound: Vec<(Variant, Pod)>,
    _pins: DirGuard,
    /// The agent binary (`sockmesh peers` reads the pins with it).
    pub agent_bin: PathBuf,
    pub tmp: PathBuf,
    pub server: Pod,
    pub clients: Vec<(Variant, Pod)>,
    _cluster: Cluster,
}

impl Topology {
    pub fn client(&self, v: Variant) -> &Pod {
        &self
            .clients
            .iter()
            .find(|(c, _)| *c == v)
            .expect("one client pod per variant")
            .1
    }

    /// The process that carries `v`'s connections besides the kernel (its agent, or
    /// HAProxy), whose CPU time a workload can charge to it.
    pub fn proxy_pid(&self, v: Variant) -> Option<u32> {
        match v {
            Variant::Direct => None,
            Variant::Sockmesh | Variant::Iptables => Some(self.agent.child.id()),
            Variant::SockmeshSplice => Some(self.splice_agent.child.id()),
            Variant::SockmeshProxy => Some(self.proxy_agent.child.id()),
            Variant::Baseline => self.baseline_agent.as_ref().map(|a| a.child.id()),
            Variant::Haproxy => Some(self.haproxy.child.id()),
        }
    }

    /// Where `v`'s agent pins its maps.
    pub fn pins(&self, v: Variant) -> Option<PathBuf> {
        match v {
            Variant::Sockmesh | Variant::Iptables => Some(self._pins.0.clone()),
            Variant::SockmeshProxy => Some(self._pins.0.join("proxy")),
            Variant::SockmeshSplice => Some(self._pins.0.join("splice")),
            Variant::Baseline => Some(self._pins.0.join("baseline")),
            Variant::Direct | Variant::Haproxy => None,
        }
    }

    /// Where the inbound workload connects for `v`: the plain server for direct, else the
    /// meshed server pod `v`'s agent enrolled.
    pub fn inbound_server(&self, v: Variant) -> Result<String> {
        if v == Variant::Direct {
            return Ok(SERVER_V4.into());
        }
        match self.inbound.iter().find(|(c, _)| *c == v) {
            Some((_, pod)) => Ok(pod.ip4().to_string()),
            None => bail!(
                "no meshed server for {} (the baseline needs --baseline-bin)",
                v.name()
            ),
        }
    }
}

/// `baseline`: the agent binary of [`Variant::Baseline`], if measured; `scale_conns`: the
/// idle connections the scale step holds, which the agents' node-wide sizes must allow.
pub fn create(
    agent_bin: &Path,
    baseline: Option<&Path>,
    tmp: &Path,
    scale_conns: usize,
) -> Result<Topology> {
    let cluster = Cluster::with_subnets(SUBNET4, SUBNET6)?;
    let server = cluster.add_pod_at("srv", SERVER_HOST)?;
    if (server.ip4().to_string(), server.ip6().to_string()) != (SERVER_V4.into(), SERVER_V6.into())
    {
        bail!(
            "the server pod has {} and {}, not {SERVER_V4} and {SERVER_V6}",
            server.ip4(),
            server.ip6()
        );
    }
    let mut clients = Vec::new();
    for (i, v) in Variant::ALL.iter().enumerate() {
        let pod = cluster.add_pod_at(v.short(), FIRST_CLIENT_HOST + i as u8)?;
        // Many short connections per run: every ephemeral port, and TIME_WAIT reuse.
        pod.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        pod.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        clients.push((*v, pod));
    }
    server.sysctl("net.core.somaxconn", "8192")?;
    let mut meshed = Vec::new();
    for (v, host) in INBOUND_SERVERS {
        if v == Variant::Baseline && baseline.is_none() {
            continue;
        }
        let pod = cluster.add_pod_at(&format!("in{}", v.short()), host)?;
        pod.sysctl("net.core.somaxconn", "8192")?;
        meshed.push((v, pod));
    }
    let in_pod = |v: Variant| {
        meshed
            .iter()
            .find(|(c, _)| *c == v)
            .map(|(_, p)| p.netns_path().to_owned())
    };
    println!(
        "    pods: server {SERVER_V4}, one client pod per variant, on a private bridge \
         (namespaces {}-*)",
        cluster.name()
    );

    let servers = start_servers(&server, tmp)?;
    let find = |v: Variant| &clients.iter().find(|(c, _)| *c == v).expect("pod").1;
    // iptables REDIRECT to the same agent: the ipt pod is enrolled (so the agent opens its
    // listener there) but the server is excluded from eBPF capture; the agent's own sockets
    // carry its mark and are not redirected again.
    let ipt = find(Variant::Iptables);
    output(ipt.command("iptables").args([
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        SERVER_V4,
        "-m",
        "mark",
        "!",
        "--mark",
        AGENT_MARK,
        "-j",
        "REDIRECT",
        "--to-ports",
        &OUTBOUND_PORT.to_string(),
    ]))
    .context("add the iptables REDIRECT rule in the iptables pod")?;

    // Named after the cluster, so a killed run's pins are swept with its namespaces.
    let pins = DirGuard(PathBuf::from(format!("/sys/fs/bpf/{}", cluster.name())));
    let agent = start_agent(
        agent_bin,
        &[find(Variant::Sockmesh), &meshed[0].1],
        ipt,
        &pins.0,
        tmp,
        scale_conns,
    )?;
    // The splice relay's agent: its own pins, no metrics port.
    let splice_pins = pins.0.join("splice");
    let splice_agent = spawn_agent_until_ready(
        Command::new(agent_bin)
            .arg("run")
            .arg("--pod")
            .arg(find(Variant::SockmeshSplice).netns_path())
            .arg("--pod")
            .args(in_pod(Variant::SockmeshSplice))
            .arg("--bpffs-dir")
            .arg(&splice_pins)
            .args(["--kernel-relay", "off", "--metrics-addr", "off"])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(tmp.join("agent-splice.log"))?),
        false,
    )?;
    // The proxy tier alone (`--fast-path off`), with pins of its own. Both agents run the
    // default policy (connect and idle timeouts, breaker, adaptive throttling), all of which
    // the kernel tier enforces: the fast path is their one difference.
    let proxy_agent = spawn_agent_until_ready(
        Command::new(agent_bin)
            .arg("run")
            .arg("--pod")
            .arg(find(Variant::SockmeshProxy).netns_path())
            .arg("--bpffs-dir")
            .arg(pins.0.join("proxy"))
            .args(["--fast-path", "off", "--kernel-relay", "auto"])
            .args(["--metrics-addr", "off", "--log-level", "warn"])
            // The scale step holds its idle connections through this agent and measures memory
            // per connection, not fairness: the per-pod and node caps (1024 per pod by default)
            // and the pod's quota of kernel origins (2048) would stop it early; the open-file
            // limit bounds it instead (see `scale`).
            .args(["--pod-max-conns", "1000000", "--max-conns", "1000000"])
            .args(["--pod-conn-origins", "200000"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(tmp.join("agent-proxy.log"))?),
        false,
    )?;
    // Another build's agent, as deployed, with pins of its own.
    let baseline_agent = match baseline {
        Some(bin) => Some(spawn_agent_until_ready(
            Command::new(bin)
                .arg("run")
                .arg("--pod")
                .arg(find(Variant::Baseline).netns_path())
                .arg("--pod")
                .args(in_pod(Variant::Baseline))
                .arg("--bpffs-dir")
                .arg(pins.0.join("baseline"))
                .args(["--metrics-addr", "off", "--log-level", "warn"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(fs::File::create(tmp.join("agent-baseline.log"))?),
            false,
        )?),
        None => None,
    };
    // Only once their agents run: a bind made before the pod is enrolled is not captured.
    let mut inbound_servers = Vec::new();
    for (v, pod) in &meshed {
        let dir = tmp.join(format!("nginx-{}", v.short()));
        fs::create_dir_all(&dir)?;
        inbound_servers.push(spawn_listening(
            "nginx",
            &mut nginx(pod, &dir)?,
            pod,
            HTTP_PORT,
            &dir,
        )?);
    }
    println!(
        "    inbound: nginx :{HTTP_PORT} in a meshed server pod per agent ({})",
        meshed
            .iter()
            .map(|(v, p)| format!("{} {}", v.name(), p.ip4()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let haproxy = start_haproxy(find(Variant::Haproxy), tmp)?;
    Ok(Topology {
        agent,
        splice_agent,
        proxy_agent,
        baseline_agent,
        haproxy,
        _servers: servers,
        _inbound_servers: inbound_servers,
        inbound: meshed,
        _pins: pins,
        agent_bin: agent_bin.to_path_buf(),
        tmp: tmp.to_path_buf(),
        server,
        clients,
        _cluster: cluster,
    })
}

fn start_servers(server: &Pod, tmp: &Path) -> Result<Vec<ChildGuard>> {
    let log = |name: &str| -> Result<Stdio> {
        Ok(fs::File::create(tmp.join(format!("{name}.log")))?.into())
    };
    let mut iperf = server.command("iperf3");
    iperf
        .args(["-s", "-p", &IPERF_PORT.to_string()])
        .stdout(log("iperf3")?)
        .stderr(log("iperf3.err")?);
    let mut sockperf = server.command("sockperf");
    sockperf
        .args(["server", "--tcp", "-i", "0.0.0.0", "-p"])
        .arg(SOCKPERF_PORT.to_string())
        .stdout(log("sockperf")?)
        .stderr(log("sockperf.err")?);
    let mut nginx = nginx(server, tmp)?;
    let mut out = Vec::new();
    for (name, cmd, port) in [
        ("iperf3", &mut iperf, IPERF_PORT),
        ("sockperf", &mut sockperf, SOCKPERF_PORT),
        ("nginx", &mut nginx, HTTP_PORT),
    ] {
        out.push(spawn_listening(name, cmd, server, port, tmp)?);
    }
    println!("    servers: iperf3 :{IPERF_PORT}, sockperf :{SOCKPERF_PORT}, nginx :{HTTP_PORT}");
    Ok(out)
}

/// nginx in `pod` serving a one-line page on [`HTTP_PORT`], its files and logs in `dir`.
fn nginx(pod: &Pod, dir: &Path) -> Result<Command> {
    let d = dir.display();
    // One worker, no keep-alive: every request of the connection-rate test is a new
    // connection that the server closes.
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log stderr error;\nworker_rlimit_nofile 65536;\nevents {{ worker_connections 16384; }}\n\
         http {{\n  access_log off;\n  keepalive_timeout 0;\n  client_body_temp_path {d}/body;\n  \
         proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  \
         scgi_temp_path {d}/scgi;\n  server {{\n    listen {HTTP_PORT} backlog=8192;\n    \
         location / {{ default_type text/plain; return 200 \"ok\\n\"; }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    fs::write(&path, conf).with_context(|| format!("write {}", path.display()))?;
    let mut nginx = pod.command("nginx");
    nginx
        .args(["-e", "stderr", "-p"])
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .stdout(fs::File::create(dir.join("nginx.log"))?)
        .stderr(fs::File::create(dir.join("nginx.err"))?);
    Ok(nginx)
}

/// Starts `cmd` (a server in `pod`) and waits until it listens on `port`; its error log is
/// `<dir>/<name>.err`.
fn spawn_listening(
    name: &str,
    cmd: &mut Command,
    pod: &Pod,
    port: u16,
    dir: &Path,
) -> Result<ChildGuard> {
    cmd.stdin(Stdio::null());
    let mut g = ChildGuard::spawn(name, cmd)?;
    wait_until(&format!("{name} to listen"), &mut g, || {
        Ok(listening(pod, port))
    })
    .with_context(|| log_of(&dir.join(format!("{name}.err"))))?;
    Ok(g)
}

/// A process's log, for the error when it did not start.
fn log_of(path: &Path) -> String {
    let log = fs::read_to_string(path).unwrap_or_default();
    format!("its log ({}):\n{}", path.display(), log.trim())
}

/// Whether something listens on TCP `port` in `ns` (per `ss`).
fn listening(ns: &Pod, port: u16) -> bool {
    output(
        ns.command("ss")
            .args(["-Htln", &format!("sport = :{port}")]),
    )
    .is_ok_and(|s| !s.trim().is_empty())
}

fn start_agent(
    bin: &Path,
    mesh: &[&Pod],
    ipt: &Pod,
    pins: &Path,
    tmp: &Path,
    scale_conns: usize,
) -> Result<ChildGuard> {
    let mut cmd = Command::new(bin);
    cmd.arg("run");
    for pod in mesh {
        cmd.arg("--pod").arg(pod.netns_path());
    }
    cmd.arg("--pod")
        .arg(format!(
            "{},exclude-cidrs={SERVER_V4}/32;{SERVER_V6}/128",
            ipt.netns_path().display()
        ))
        .arg("--bpffs-dir")
        .arg(pins)
        // Serving /metrics as deployed, on a port of its own: another bench (or agent) may hold
        // the default one.
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(["--kernel-relay", "auto", "--log-level", "warn"])
        .args(["--fast-path", "auto"])
        .args(fast_path_scale_args(scale_conns))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(tmp.join("agent.log"))?);
    println!("    $ {} &", describe(&cmd));
    spawn_agent_until_ready(&mut cmd, false)
}

/// What the fast path's agent needs to let the scale step's connections all go direct: room
/// in the node's map of direct sockets (a quarter spare, for the workloads' sockets still
/// closing), all of it the client pod's to take (`--pod-direct-conns`: the bench has one
/// client pod, not a node of 110).
fn fast_path_scale_args(scale_conns: usize) -> Vec<String> {
    let room =
        (scale_conns + scale_conns / 4).max(sockmesh_common::map_sizes::FAST_SOCKETS as usize);
    vec![
        "--fast-path-sockets".into(),
        room.to_string(),
        "--pod-direct-conns".into(),
        room.to_string(),
    ]
}

fn start_haproxy(pod: &Pod, tmp: &Path) -> Result<ChildGuard> {
    let mut conf = String::from(
        "global\n  maxconn 4096\n  nbthread 2\n\
         defaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n  \
         timeout client 1h\n  timeout server 1h\n",
    );
    for port in [IPERF_PORT, SOCKPERF_PORT, HTTP_PORT] {
        conf.push_str(&format!(
            "listen p{port}\n  bind 127.0.0.1:{port}\n  server s {SERVER_V4}:{port}\n"
        ));
    }
    let path = tmp.join("haproxy.cfg");
    fs::write(&path, conf).with_context(|| format!("write {}", path.display()))?;
    let mut cmd = pod.command("haproxy");
    cmd.arg("-db")
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(fs::File::create(tmp.join("haproxy.log"))?)
        .stderr(fs::File::create(tmp.join("haproxy.err"))?);
    let mut g = ChildGuard::spawn("haproxy", &mut cmd)?;
    wait_until("haproxy to listen", &mut g, || {
        Ok(listening(pod, HTTP_PORT))
    })
    .with_context(|| log_of(&tmp.join("haproxy.err")))?;
    println!("    haproxy (TCP mode, 2 threads, splice-auto) in its client pod");
    Ok(g)
}
