//! A test "cluster": a private switch namespace with a bridge, and pods attached to it. The
//! integration tests use it, and so does `cargo xtask bench` for its private network (on
//! subnets of its own, with pods at the host numbers it chooses).
//!
//! Nothing is created in the root namespace (no bridge, route or address), so tests running in
//! parallel can all use the same subnets without colliding, and nothing they do is visible to
//! the host.

use crate::names::{unique_name, valid_label};
use crate::netns::NetNs;
use crate::process::Proc;
use crate::tempdir::TempDir;
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// [`Cluster::new`]'s pods get 10.77.0.(k+10)/24 ...
pub const SUBNET4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 0);
/// ... and fd77::(k+10)/64, where the last group is written with the same digits as the IPv4
/// octet (pod 0: 10.77.0.10 and fd77::10), so addresses are easy to match up in logs.
pub const SUBNET6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0);
const FIRST_HOST: u32 = 10;
const MAX_PODS: u32 = 240;
/// Last address of the subnets: inside them (so on-link, never routed anywhere) but never given
/// to a pod, for tests that need a destination that does not answer.
const UNUSED_HOST: u8 = 254;

/// Upper bound for one [`Pod::exec`].
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

const BRIDGE: &str = "br0";
const SO_NETNS_COOKIE: libc::c_int = 71;

fn host4(subnet: Ipv4Addr, h: u8) -> Ipv4Addr {
    let [a, b, c, _] = subnet.octets();
    Ipv4Addr::new(a, b, c, h)
}

fn host6(subnet: Ipv6Addr, h: u8) -> Ipv6Addr {
    // Decimal digits read as hex: 25 -> 0x25, so fd77::25 pairs with 10.77.0.25.
    let group = u16::from_str_radix(&h.to_string(), 16).expect("decimal digits are hex digits");
    let mut s = subnet.segments();
    s[7] = group;
    Ipv6Addr::from(s)
}

/// One switch namespace holding a bridge; pods are namespaces with an `eth0` veth plugged into
/// it. Dropping the cluster deletes the switch (pods dropped later just lose their link).
#[derive(Debug)]
pub struct Cluster {
    switch: NetNs,
    base: String,
    subnet4: Ipv4Addr,
    subnet6: Ipv6Addr,
    /// Host numbers given out so far.
    taken: Mutex<Vec<u8>>,
    tmp: Arc<TempDir>,
}

impl Cluster {
    /// A cluster on [`SUBNET4`] and [`SUBNET6`].
    pub fn new() -> Result<Self> {
        Self::with_subnets(SUBNET4, SUBNET6)
    }

    /// A cluster whose pods get `subnet4`'s first three octets with the host number as the
    /// fourth (/24), and `subnet6`'s first seven groups with the host number's decimal digits
    /// as the eighth (/64): host 11 of 10.79.0.0 and fd79:: is 10.79.0.11 and fd79::11.
    pub fn with_subnets(subnet4: Ipv4Addr, subnet6: Ipv6Addr) -> Result<Self> {
        Self::build(unique_name(), subnet4, subnet6)
    }

    /// Like [`Cluster::with_subnets`], with fixed names, `<base>-sw` and `<base>-<label>`, for
    /// a tool whose user types them (`cargo xtask demo`'s `smdemo-client`). They must be free:
    /// remove an earlier run's with [`crate::netns::delete_leftovers`]. Not for tests, which
    /// run in parallel: [`crate::cleanup::sweep_stale`] knows only the unique names.
    pub fn named(base: &str, subnet4: Ipv4Addr, subnet6: Ipv6Addr) -> Result<Self> {
        if !valid_label(base) {
            bail!("bad cluster name {base:?}");
        }
        Self::build(base.to_owned(), subnet4, subnet6)
    }

    fn build(base: String, subnet4: Ipv4Addr, subnet6: Ipv6Addr) -> Result<Self> {
        crate::sys::require_root();
        let switch = NetNs::create(&format!("{base}-sw"))?;
        // The switch only forwards frames; without IPv6 on its ports it sends no router
        // solicitations or MLD reports of its own into the pods' captures.
        switch.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        // Snooping off: with no multicast querier on this private segment, flooding is the
        // predictable behaviour for IPv6 neighbour discovery.
        switch.ip(&[
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        switch.ip(&["link", "set", BRIDGE, "up"])?;
        Ok(Self {
            switch,
            base,
            subnet4,
            subnet6,
            taken: Mutex::new(Vec::new()),
            tmp: Arc::new(TempDir::new()?),
        })
    }

    /// The cluster's name (unique, `smt-<pid>-<n>-<rand>`, unless [`Cluster::named`]), which
    /// starts every namespace name in it: name other resources of the same run after it, and
    /// [`crate::cleanup::sweep_stale`] removes them with the namespaces if the run is killed.
    pub fn name(&self) -> &str {
        &self.base
    }

    /// The switch namespace (e.g. to capture traffic on `br0`).
    pub fn switch(&self) -> &NetNs {
        &self.switch
    }

    /// Scratch directory shared by the cluster's pods (process logs go there).
    pub fn tmp(&self) -> &Path {
        self.tmp.path()
    }

    /// Creates pod `label` (letters, digits, '-', '_'; unique in this cluster): a namespace
    /// named `<cluster>-<label>` with `lo` up and `eth0` on the bridge, with the next free
    /// addresses (host numbers from 10 up). Returns once both addresses are usable.
    pub fn add_pod(&self, label: &str) -> Result<Pod> {
        let host = {
            let mut taken = self.taken.lock().expect("no panic while held");
            let free = (FIRST_HOST..FIRST_HOST + MAX_PODS)
                .map(|h| u8::try_from(h).expect("bounded by MAX_PODS"))
                .find(|h| !taken.contains(h));
            let Some(host) = free else {
                bail!("too many pods in one cluster");
            };
            taken.push(host);
            host
        };
        self.attach(label, host)
    }

    /// Like [`Cluster::add_pod`], at host number `host` (1..=253, not yet given out).
    pub fn add_pod_at(&self, label: &str, host: u8) -> Result<Pod> {
        {
            let mut taken = self.taken.lock().expect("no panic while held");
            if host == 0 || host >= UNUSED_HOST || taken.contains(&host) {
                bail!(
                    "host number {host} is taken or outside 1..={}",
                    UNUSED_HOST - 1
                );
            }
            taken.push(host);
        }
        self.attach(label, host)
    }

    fn attach(&self, label: &str, host: u8) -> Result<Pod> {
        if !valid_label(label) || label == "sw" {
            bail!("bad pod label {label:?}");
        }
        let ns = NetNs::create(&format!("{}-{label}", self.base))?;
        // Set before eth0 exists so the device is created with DAD off: addresses are usable
        // at once instead of after ~1 s of duplicate detection.
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;

        // Both ends are created directly in their namespaces, so no name is ever taken in the
        // root namespace, even for an instant. The switch-side name is unique within the switch.
        let port = format!("vp{host}");
        crate::sys::ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            self.switch.name(),
        ])?;
        self.switch
            .ip(&["link", "set", &port, "master", BRIDGE, "up"])?;

        let ip4 = host4(self.subnet4, host);
        let ip6 = host6(self.subnet6, host);
        ns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", "eth0"])?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ns.ip(&["link", "set", "eth0", "up"])?;

        let pod = Pod {
            ns,
            label: label.to_owned(),
            ip4: Some(ip4),
            ip6: Some(ip6),
            tmp: Arc::clone(&self.tmp),
            spawned: AtomicU32::new(0),
        };
        pod.wait_addresses_usable()?;
        Ok(pod)
    }

    /// An address in the pods' IPv4 subnet that no pod has: connecting to it from a pod gets no
    /// answer (ARP fails on the private bridge), which is how tests get a "dead upstream"
    /// without sending anything off the machine.
    pub fn unused_ip4(&self) -> Ipv4Addr {
        host4(self.subnet4, UNUSED_HOST)
    }

    /// IPv6 counterpart of [`Cluster::unused_ip4`].
    pub fn unused_ip6(&self) -> Ipv6Addr {
        host6(self.subnet6, UNUSED_HOST)
    }
}

/// A pod: a network namespace plus the processes the test starts in it. Dropping it kills every
/// process still in the namespace (daemons included) and deletes the namespace.
#[derive(Debug)]
pub struct Pod {
    ns: NetNs,
    label: String,
    ip4: Option<Ipv4Addr>,
    ip6: Option<Ipv6Addr>,
    tmp: Arc<TempDir>,
    spawned: AtomicU32,
}

impl Pod {
    /// A pod with only `lo` (no cluster, no addresses): for loopback-only tests.
    pub fn isolated(label: &str) -> Result<Self> {
        crate::sys::require_root();
        if !valid_label(label) {
            bail!("bad pod label {label:?}");
        }
        Ok(Self {
            ns: NetNs::create(&format!("{}-{label}", unique_name()))?,
            label: label.to_owned(),
            ip4: None,
            ip6: None,
            tmp: Arc::new(TempDir::new()?),
            spawned: AtomicU32::new(0),
        })
    }

    /// The namespace name (what `ip netns exec` takes).
    pub fn name(&self) -> &str {
        self.ns.name()
    }

    /// The short label given to `add_pod`.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// `/var/run/netns/<name>`: what `sockmesh run --pod` takes.
    pub fn netns_path(&self) -> &Path {
        self.ns.path()
    }

    pub fn netns(&self) -> &NetNs {
        &self.ns
    }

    /// eth0's IPv4 address. Panics for an isolated pod.
    pub fn ip4(&self) -> Ipv4Addr {
        self.ip4
            .unwrap_or_else(|| panic!("pod {} is isolated: no eth0", self.label))
    }

    /// eth0's IPv6 address. Panics for an isolated pod.
    pub fn ip6(&self) -> Ipv6Addr {
        self.ip6
            .unwrap_or_else(|| panic!("pod {} is isolated: no eth0", self.label))
    }

    /// `ip4():port`.
    pub fn addr4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip4()), port)
    }

    /// `[ip6()]:port`.
    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ip6()), port)
    }

    /// See [`NetNs::run`]: `f` runs on a fresh thread inside this pod's namespace.
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        self.ns.run(f)
    }

    /// `ip -n <pod> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        self.ns.ip(args)
    }

    /// See [`NetNs::sysctl`] (e.g. `pod.sysctl("net.core.somaxconn", "8192")`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.ns.sysctl(key, value)
    }

    /// A `Command` that runs `program` in this pod (`ip netns exec <name> <program>`, which
    /// also applies /etc/netns/<name> overrides and a matching /sys). Spawn it with
    /// [`Proc::spawn`] to get a guard, or run it to completion with `output()`.
    ///
    /// The child also enters the namespace itself between fork and exec, so by the time
    /// `spawn()` returns it is already inside the pod (`ip` would otherwise do so a moment
    /// later, and a test inspecting the fresh process could see the root namespace).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.name(), program]);
        // Opened now, so the child needs no path lookup; O_CLOEXEC (std's default) closes it
        // at exec, and the Command owns it until then.
        match File::open(self.netns_path()) {
            Ok(ns) => {
                // SAFETY: the closure only makes the async-signal-safe setns syscall.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
            // `ip netns exec` will report the missing namespace itself.
            Err(e) => eprintln!("[smt] warning: open {}: {e}", self.netns_path().display()),
        }
        cmd
    }

    /// Starts `argv` in this pod with stdin closed and stdout+stderr appended to a log file in
    /// the cluster's temp dir (printed if the test fails). The guard kills it on drop.
    pub fn spawn(&self, argv: &[&str]) -> Result<Proc> {
        let (program, args) = argv.split_first().context("empty argv")?;
        let n = self.spawned.fetch_add(1, Ordering::Relaxed);
        let base = Path::new(program)
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or("proc");
        let log = self.tmp.join(format!("{}-{base}-{n}.log", self.label));
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = self.command(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        Proc::spawn(cmd, &format!("{}:{base}", self.label), Some(log))
    }

    /// Runs `argv` in this pod to completion (at most [`EXEC_TIMEOUT`]) and returns its stdout
    /// (error if it fails). Fine for commands that daemonize: only the command itself is
    /// awaited, and the daemon is killed with the pod.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        let (program, args) = argv.split_first().context("empty argv")?;
        crate::sys::run_bounded(
            self.command(program).args(args),
            EXEC_TIMEOUT,
            self.tmp.path(),
        )
    }

    /// See [`NetNs::set_etc_file`] (e.g. `pod.set_etc_file("resolv.conf", "nameserver ...")`).
    pub fn set_etc_file(&self, file: &str, contents: &str) -> Result<()> {
        self.ns.set_etc_file(file, contents)
    }

    /// The namespace cookie (`SO_NETNS_COOKIE`), as the agent reports it in its events.
    pub fn netns_cookie(&self) -> Result<u64> {
        self.run(|| -> Result<u64> {
            let sock = UdpSocket::bind("127.0.0.1:0")
                .or_else(|_| UdpSocket::bind("[::1]:0"))
                .context("socket for SO_NETNS_COOKIE")?;
            let mut cookie: u64 = 0;
            let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
            // SAFETY: valid fd, and a u64 buffer with its length.
            let rc = unsafe {
                libc::getsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    SO_NETNS_COOKIE,
                    (&mut cookie as *mut u64).cast(),
                    &mut len,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error()).context("SO_NETNS_COOKIE");
            }
            Ok(cookie)
        })
    }

    /// Inode of the pod's namespace (compare with /proc/<pid>/ns/net).
    pub fn netns_inode(&self) -> Result<u64> {
        self.ns.inode()
    }

    /// Binding to an address fails with EADDRNOTAVAIL while it is unusable (tentative); with
    /// `nodad` it is usable at once, so this normally succeeds on the first try. There is no
    /// event to wait on short of rtnetlink, hence the small bounded retry.
    fn wait_addresses_usable(&self) -> Result<()> {
        let addrs = [self.ip4.map(IpAddr::V4), self.ip6.map(IpAddr::V6)];
        self.run(|| -> Result<()> {
            let deadline = Instant::now() + Duration::from_secs(3);
            for ip in addrs.into_iter().flatten() {
                loop {
                    match UdpSocket::bind(SocketAddr::new(ip, 0)) {
                        Ok(_) => break,
                        Err(_) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => return Err(e).with_context(|| format!("{ip} never usable")),
                    }
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_mirror_each_other() {
        assert_eq!(host4(SUBNET4, 10), Ipv4Addr::new(10, 77, 0, 10));
        assert_eq!(host6(SUBNET6, 10), "fd77::10".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            host6(SUBNET6, 249),
            "fd77::249".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            host6(SUBNET6, UNUSED_HOST),
            "fd77::254".parse::<Ipv6Addr>().unwrap()
        );
        let (v4, v6) = (Ipv4Addr::new(10, 79, 0, 0), "fd79::".parse().unwrap());
        assert_eq!(host4(v4, 11).to_string(), "10.79.0.11");
        assert_eq!(host6(v6, 11).to_string(), "fd79::11");
    }
}
