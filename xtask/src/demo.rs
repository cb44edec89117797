//! `cargo xtask demo`: two pods on a private bridge, nginx and dnsmasq in one, the agent enrolling
//! the other, and real curl/dig traffic through the mesh. Everything it creates lives in its own
//! network namespaces and one bpffs directory, and is removed at the end, on error too.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sockmesh_tests::netns::delete_leftovers;
use sockmesh_tests::{Cluster, Pod};

use crate::build::build_agent;
use crate::prereqs::{self, Level};
use crate::util::{bail_if_interrupted, catch_interrupts, describe, output, ChildGuard};

/// The demo's namespaces are `smdemo-sw` (the switch), `smdemo-client` and `smdemo-server`:
/// fixed names, so the commands it prints can be typed again.
const CLUSTER: &str = "smdemo";
const CLIENT: &str = "smdemo-client";
/// On 10.78.0.0/24 and fd78::/64: the client is host 10, the server host 11.
const SUBNET4: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 0);
const SUBNET6: Ipv6Addr = Ipv6Addr::new(0xfd78, 0, 0, 0, 0, 0, 0, 0);
const SERVER_V4: &str = "10.78.0.11";
const SERVER_V6: &str = "fd78::11";
const DNS_NAME: &str = "demo.sockmesh.test";
const BPFFS_DIR: &str = "/sys/fs/bpf/sockmesh-demo";
const GREETING: &str = "hello from server";
/// The server's second port: the demo's policy file rate-limits it.
const LIMITED_PORT: u16 = 8081;
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(15);

pub fn demo() -> Result<()> {
    prereqs::ensure(Level::Run)?;
    // SOCKMESH_BIN runs the demo against another build of the agent (e.g. a release build).
    let agent = match std::env::var_os("SOCKMESH_BIN") {
        Some(bin) => {
            println!(
                "xtask: using the agent at SOCKMESH_BIN={}",
                Path::new(&bin).display()
            );
            PathBuf::from(bin)
        }
        None => build_agent()?,
    };
    catch_interrupts();
    let mut made = Made::default();
    let result = run(&agent, &mut made);
    println!("\n==> cleaning up");
    drop(made);
    match result {
        Ok(()) => {
            println!("\ndemo: all steps passed; everything the demo created has been removed");
            Ok(())
        }
        Err(e) => Err(e.context("demo failed (everything it created has been removed)")),
    }
}

/// Everything the demo creates. Fields drop in declaration order: the agent stops before its
/// pins are removed, and processes stop before their namespaces are deleted.
#[derive(Default)]
struct Made {
    agent: Option<ChildGuard>,
    pins: Option<DirGuard>,
    dnsmasq: Option<ChildGuard>,
    nginx: Option<ChildGuard>,
    tmp: Option<DirGuard>,
    /// Client, server, and the cluster (its switch) last.
    pods: Option<(Pod, Pod, Cluster)>,
}

struct Narrator(usize);

impl Narrator {
    fn step<T>(&mut self, title: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        bail_if_interrupted()?;
        self.0 += 1;
        println!("\n==> step {}: {title}", self.0);
        f().with_context(|| format!("step {} failed: {title}", self.0))
    }
}

fn run(agent: &Path, made: &mut Made) -> Result<()> {
    let mut n = Narrator(0);
    let (_, server, _) = made.pods.insert(n.step(
        "Create a private \"switch\" network namespace with a bridge, and two pods \
         (smdemo-client, smdemo-server) wired to it by veth pairs; nothing is added to the \
         host's own namespace",
        wire_pods,
    )?);
    let tmp = std::env::temp_dir().join(format!("sockmesh-demo-{}", std::process::id()));
    let tmp = made.tmp.insert(DirGuard::create(tmp)?);
    let title = format!(
        "Start nginx in the server pod: \"{GREETING}\" on ports 80 and {LIMITED_PORT}, IPv4 and IPv6"
    );
    made.nginx = Some(n.step(&title, || start_nginx(server, &tmp.0))?);
    let title = format!("Start dnsmasq in the server pod: {DNS_NAME} -> {SERVER_V4}");
    made.dnsmasq = Some(n.step(&title, || start_dnsmasq(server))?);
    let curl_v4 = format!("curl -sS --max-time 5 http://{SERVER_V4}/");
    let curl_v6 = format!("curl -sS --max-time 5 -g http://[{SERVER_V6}]/");
    n.step(
        "Check the plain network: the client reaches the server, no mesh yet",
        || in_client(&curl_v4, GREETING),
    )?;

    remove_leftover_pins()?;
    made.pins = Some(DirGuard(PathBuf::from(BPFFS_DIR)));
    let title = format!(
        "Start the sockmesh agent enrolling the client pod (pins under {BPFFS_DIR}); wait for its \
         \"ready\" event"
    );
    let policy = write_policy(&tmp.0)?;
    let agent_proc = made
        .agent
        .insert(n.step(&title, || start_agent(agent, &policy))?);

    n.step(
        "HTTP over IPv4 from the client pod, now through the mesh: the first through the agent, \
         which hands the peer to the kernel tier, the next direct, policed in the kernel",
        || (0..3).try_for_each(|_| in_client(&curl_v4, GREETING)),
    )?;
    n.step(
        "HTTP over IPv6 from the client pod, through the mesh (the same, for the IPv6 peer)",
        || (0..3).try_for_each(|_| in_client(&curl_v6, GREETING)),
    )?;
    n.step(
        "DNS from the client pod, through the agent's DNS listener",
        || {
            let dig = format!("dig @{SERVER_V4} {DNS_NAME} +short +time=2 +tries=1");
            in_client(&dig, SERVER_V4)
        },
    )?;
    let title = format!(
        "Per-peer policy: {SERVER_V4}:{LIMITED_PORT} admits a burst of 2 connections, then 1 a \
         minute. Five curls: two answered, the first through the agent (which then hands the \
         peer to the kernel tier) and the second direct; the kernel refuses the rest at \
         connect(), none reaching the agent"
    );
    n.step(&title, || {
        let curl = format!("curl -sS --max-time 5 http://{SERVER_V4}:{LIMITED_PORT}/");
        let outcomes: Vec<String> = (0..5)
            .map(|_| try_in_client(&curl))
            .collect::<Result<_>>()?;
        let answered = outcomes.iter().filter(|o| o.as_str() == GREETING).count();
        if answered != 2 {
            bail!("expected the first 2 answered and the rest refused, got {outcomes:?}");
        }
        Ok(())
    })?;
    let limited = format!("{SERVER_V4}:{LIMITED_PORT}");
    n.step(
        "Which peer is throttled, and why (sockmesh peers, from the pinned maps the agent \
         writes every second)",
        || {
            // The agent writes its per-peer figures once a second: wait for the one that
            // has the throttled attempt.
            wait_until("the agent's per-peer figures", agent_proc, || {
                let mut cmd = Command::new(agent);
                cmd.args(["peers", "--bpffs-dir", BPFFS_DIR, "--json"]);
                let v: serde_json::Value = serde_json::from_str(&output(&mut cmd)?)?;
                let row = v["peers"]
                    .as_array()
                    .and_then(|rows| rows.iter().find(|r| r["peer"].as_str() == Some(&limited)));
                Ok(row.is_some_and(|r| {
                    r["throttled"]["rate"] == 3
                        && r["fast_rejects"] == 3
                        && r["conns_total"] == 2
                        && r["direct"] == 1
                }))
            })?;
            let mut cmd = Command::new(agent);
            cmd.args(["peers", "--bpffs-dir", BPFFS_DIR, "--sort", "throttled"]);
            println!("    $ {}", describe(&cmd));
            print_indented(&output(&mut cmd)?);
            println!(
                "    {limited}: 2 connections (TIER kernel, 1 direct), 3 refused at connect() \
                 by the kernel (THROTTLED rate=3, FAST_REJ 3)"
            );
            Ok(())
        },
    )?;
    n.step("What the kernel programs counted (sockmesh stats)", || {
        let mut cmd = Command::new(agent);
        cmd.args(["stats", "--bpffs-dir", BPFFS_DIR]);
        println!("    $ {}", describe(&cmd));
        print_indented(&output(&mut cmd)?);
        Ok(())
    })?;
    n.step("Stop the agent with SIGTERM", || {
        match agent_proc.stop(STOP_GRACE)? {
            Some(status) if status.success() => {
                println!("    the agent exited cleanly ({status})");
                Ok(())
            }
            Some(status) => bail!("the agent exited with {status} after SIGTERM"),
            None => bail!("the agent did not exit within {STOP_GRACE:?} of SIGTERM (killed it)"),
        }
    })
}

/// The integration tests' cluster, with the demo's fixed names: a switch namespace with a
/// bridge, and the two pods on veths.
fn wire_pods() -> Result<(Pod, Pod, Cluster)> {
    for name in delete_leftovers(&format!("{CLUSTER}-")) {
        println!("    removed network namespace {name} left over from an earlier run");
    }
    let cluster = Cluster::named(CLUSTER, SUBNET4, SUBNET6)?;
    let client = cluster.add_pod_at("client", 10)?;
    let server = cluster.add_pod_at("server", 11)?;
    if client.name() != CLIENT || server.ip4().to_string() != SERVER_V4 {
        bail!(
            "the pods are {} and {}, not {CLIENT} and {SERVER_V4}",
            client.name(),
            server.ip4()
        );
    }
    for pod in [&client, &server] {
        println!(
            "    {}: eth0 {}/24 and {}/64, lo up",
            pod.name(),
            pod.ip4(),
            pod.ip6()
        );
    }
    Ok((client, server, cluster))
}

fn start_nginx(server: &Pod, dir: &Path) -> Result<ChildGuard> {
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log stderr warn;\nevents {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         server {{\n    listen 80;\n    listen [::]:80;\n    listen {LIMITED_PORT};\n    \
         location / {{ default_type text/plain; return 200 \"{GREETING}\\n\"; }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    fs::write(&path, conf).with_context(|| format!("could not write {}", path.display()))?;
    let mut cmd = server.command("nginx");
    cmd.arg("-e")
        .arg("stderr")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .stdin(Stdio::null());
    let mut nginx = ChildGuard::spawn("nginx", &mut cmd)?;
    wait_until("nginx to answer", &mut nginx, || {
        let mut probe = server.command("curl");
        probe.args(["-s", "--max-time", "1", "http://127.0.0.1/"]);
        Ok(output(&mut probe).is_ok_and(|body| body.trim() == GREETING))
    })?;
    println!("    nginx is answering (config: {})", path.display());
    Ok(nginx)
}

fn start_dnsmasq(server: &Pod) -> Result<ChildGuard> {
    let mut cmd = server.command("dnsmasq");
    cmd.args([
        "--no-daemon",
        "--no-resolv",
        "--no-hosts",
        "--conf-file=/dev/null",
        &format!("--address=/{DNS_NAME}/{SERVER_V4}"),
        &format!("--listen-address={SERVER_V4}"),
        "--bind-interfaces",
        "--port",
        "53",
    ])
    .stdin(Stdio::null());
    let mut dnsmasq = ChildGuard::spawn("dnsmasq", &mut cmd)?;
    wait_until("dnsmasq to answer", &mut dnsmasq, || {
        let mut probe = server.command("dig");
        probe.args([
            &format!("@{SERVER_V4}"),
            DNS_NAME,
            "+short",
            "+time=1",
            "+tries=1",
        ]);
        Ok(output(&mut probe).is_ok_and(|out| out.trim() == SERVER_V4))
    })?;
    println!("    dnsmasq is answering");
    Ok(dnsmasq)
}

/// The demo's policy file: one rule, for the server's second port.
fn write_policy(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("policy.toml");
    let text = format!(
        "# The demo's policy: flags give the defaults, rules override them per peer.\n\
         [[rule]]\n\
         name = \"demo: rate-limited API\"\n\
         direction = \"outbound\"\n\
         peer = \"{SERVER_V4}/32\"\n\
         ports = {LIMITED_PORT}\n\
         conn_rate = \"1/m\"\n\
         conn_burst = 2\n"
    );
    fs::write(&path, &text).with_context(|| format!("could not write {}", path.display()))?;
    println!("    policy file {}:", path.display());
    print_indented(&text);
    Ok(path)
}

fn start_agent(agent: &Path, policy: &Path) -> Result<ChildGuard> {
    let mut cmd = Command::new(agent);
    cmd.args([
        "run",
        "--pod",
        &format!("/var/run/netns/{CLIENT}"),
        "--bpffs-dir",
        BPFFS_DIR,
    ])
    .arg("--policy")
    .arg(policy)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .env("NO_COLOR", "1"); // its log is relayed line by line below
    println!("    $ {} &", describe(&cmd));
    spawn_agent_until_ready(&mut cmd, true)
}

/// Starts the agent (`cmd` with stdout piped) and waits for its ready event. With `echo`, its
/// events (and its log, if stderr is piped too) are printed as they come.
pub(crate) fn spawn_agent_until_ready(cmd: &mut Command, echo: bool) -> Result<ChildGuard> {
    let mut proc = ChildGuard::spawn("the agent", cmd)?;
    let stdout = proc
        .child
        .stdout
        .take()
        .context("the agent's stdout must be piped")?;
    let (ready_tx, ready_rx) = mpsc::channel();
    // Lifecycle events are JSON lines on stdout; logs go to stderr.
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if echo {
                println!("    [agent event] {line}");
            }
            if is_ready_event(&line) {
                let _ = ready_tx.send(());
            }
        }
    });
    if let Some(stderr) = proc.child.stderr.take() {
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("    [agent log] {line}");
            }
        });
    }
    let start = Instant::now();
    loop {
        bail_if_interrupted()?;
        match ready_rx.recv_timeout(Duration::from_millis(200)) {
            Ok(()) => break,
            Err(RecvTimeoutError::Timeout) => {
                proc.ensure_running()?;
                if start.elapsed() > READY_TIMEOUT {
                    bail!("the agent printed no {{\"event\":\"ready\"}} line within {READY_TIMEOUT:?}");
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                thread::sleep(Duration::from_millis(500));
                proc.ensure_running()?;
                bail!("the agent closed its stdout without printing a ready event");
            }
        }
    }
    println!(
        "    the agent is ready after {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(proc)
}

/// Whether a stdout line is the agent's `{"event":"ready",...}` lifecycle event.
fn is_ready_event(line: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("event")?.as_str().map(|e| e == "ready"))
        .unwrap_or(false)
}

/// Runs a command line (split on spaces) in the client pod, shows what it printed, and checks
/// that it printed `expected`.
fn in_client(line: &str, expected: &str) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", CLIENT])
        .args(line.split_whitespace());
    println!("    $ {}", describe(&cmd));
    let out = output(&mut cmd)?;
    print_indented(&out);
    if out.trim() != expected {
        bail!("`{line}` printed {:?}, expected {expected:?}", out.trim());
    }
    Ok(())
}

/// Runs `line` in the client pod and returns what it printed: stdout if it succeeded, else
/// its error message (a refused or reset connection is an expected outcome here).
fn try_in_client(line: &str) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", CLIENT])
        .args(line.split_whitespace());
    println!("    $ {}", describe(&cmd));
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", describe(&cmd)))?;
    let text = if out.status.success() {
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    } else {
        String::from_utf8_lossy(&out.stderr).trim().to_owned()
    };
    print_indented(&text);
    Ok(text)
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("      {line}");
    }
}

pub(crate) fn wait_until(
    what: &str,
    proc: &mut ChildGuard,
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        bail_if_interrupted()?;
        proc.ensure_running()?;
        if ready()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn remove_leftover_pins() -> Result<()> {
    if Path::new(BPFFS_DIR).exists() {
        println!("    removing {BPFFS_DIR} left over from an earlier run");
        fs::remove_dir_all(BPFFS_DIR).with_context(|| format!("could not remove {BPFFS_DIR}"))?;
    }
    Ok(())
}

/// A directory removed (recursively) when dropped: the temp dir, and the agent's bpffs pins.
pub(crate) struct DirGuard(pub PathBuf);

impl DirGuard {
    pub(crate) fn create(path: PathBuf) -> Result<Self> {
        fs::create_dir_all(&path)
            .with_context(|| format!("could not create {}", path.display()))?;
        Ok(DirGuard(path))
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if self.0.exists() {
            match fs::remove_dir_all(&self.0) {
                Ok(()) => println!("    removed {}", self.0.display()),
                Err(e) => eprintln!("    warning: could not remove {}: {e}", self.0.display()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_ready_event;

    #[test]
    fn ready_event() {
        assert!(is_ready_event(r#"{"event":"ready","pods":1}"#));
        assert!(is_ready_event(r#"{ "event" : "ready" }"#));
        assert!(!is_ready_event(r#"{"event":"starting"}"#));
        assert!(!is_ready_event("ready"));
        assert!(!is_ready_event(r#"{"msg":"event ready"}"#));
        assert!(!is_ready_event(""));
    }
}
