//! The kernel side as the agent drives it: load the programs, pin the maps, attach every
//! program at the cgroup2 root as a multi-attach link, enrol pods, and take it all down again.
pub mod capacity;
pub mod direct_bytes;
pub mod endpoints;
pub mod heartbeat;
pub mod links;
mod object;
mod owned;
pub mod preflight;
pub mod rawmap;
pub mod relay;
pub mod sink;
pub mod sockstore;
pub mod stats;
pub mod steer;
pub mod verdicts;

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuHashMap, PerCpuValues, RingBuf},
    programs::Program,
    Ebpf,
};
use sockmesh_common::{
    config_flags, map_names, program_names as prog, quota::PodQuota, DnsKey, GlobalConfig,
    PodConfig, PodStats, SockAddr, TupleKey, SCHEMA_VERSION,
};
use tracing::{info, warn};

use aya_obj::generated::bpf_attach_type as at;
use links::Link;
use object::take;
use preflight::PinDirLock;
use std::os::fd::AsFd;

/// Every program, in attach order: the hooks that only *read* state first, so by the time
/// connect/bind start redirecting, the hooks that complete the picture are already in place.
const PROGRAMS: [(&str, at); 13] = [
    (prog::SOCK_RELEASE, at::BPF_CGROUP_INET_SOCK_RELEASE),
    (prog::SOCK_OPS, at::BPF_CGROUP_SOCK_OPS),
    (prog::GETSOCKOPT, at::BPF_CGROUP_GETSOCKOPT),
    (prog::GETPEERNAME4, at::BPF_CGROUP_INET4_GETPEERNAME),
    (prog::GETPEERNAME6, at::BPF_CGROUP_INET6_GETPEERNAME),
    (prog::RECVMSG4, at::BPF_CGROUP_UDP4_RECVMSG),
    (prog::RECVMSG6, at::BPF_CGROUP_UDP6_RECVMSG),
    (prog::SENDMSG4, at::BPF_CGROUP_UDP4_SENDMSG),
    (prog::SENDMSG6, at::BPF_CGROUP_UDP6_SENDMSG),
    (prog::BIND4, at::BPF_CGROUP_INET4_BIND),
    (prog::BIND6, at::BPF_CGROUP_INET6_BIND),
    (prog::CONNECT4, at::BPF_CGROUP_INET4_CONNECT),
    (prog::CONNECT6, at::BPF_CGROUP_INET6_CONNECT),
];

pub struct DatapathOptions<'a> {
    pub bpffs_dir: &'a Path,
    pub cgroup_root: &'a Path,
    pub mark: u32,
    pub outbound_port: u16,
    pub dns_port: u16,
    /// Attach `sock_create` so enrolled pods cannot create raw IP sockets.
    pub deny_raw_sockets: bool,
    pub inbound_port: u16,
    pub keep_pins: bool,
    pub kernel_log: bool,
    /// Programs stop capturing when the heartbeat is older than this; `None` never.
    pub fail_open_after: Option<std::time::Duration>,
    /// Attach the in-kernel relay (sockhash + stream verdict) for unshaped connections.
    pub kernel_relay: relay::Mode,
    /// Each pod's quota of `SM_ORIG_TUPLE`, `SM_DNS_ORIG`, `SM_IN_BINDS` and `SM_FAST_SOCKS`
    /// entries (0: none).
    pub pod_origin_quota: u32,
    pub pod_dns_quota: u32,
    pub pod_bind_quota: u32,
    pub pod_fast_quota: u32,
    /// Direct sockets of the kernel fast path the node tracks at once (`SM_FAST_SOCKS`).
    pub fast_sockets: u32,
}

/// Maps the proxies use while running.
pub struct KernelMaps {
    /// Real client of an inbound connection, keyed by (netns, agent addr, app addr).
    pub inbound_peers: Mutex<HashMap<MapData, TupleKey, SockAddr>>,
    /// Original DNS server by (netns, client port).
    pub dns_origins: Mutex<HashMap<MapData, DnsKey, SockAddr>>,
    /// Fast-reject verdicts that `connect4/6` reads.
    pub verdicts: verdicts::Verdicts,
    /// The kernel tier's byte totals of ended direct connections, per peer.
    pub direct_bytes: direct_bytes::DirectBytes,
    /// The endpoints connect4/6 picks for kernel-tier Services, and their results.
    pub endpoints: endpoints::KernelEndpoints,
    /// The in-kernel relay, when `--kernel-relay on` or `auto`.
    pub relay: Option<relay::RelayMaps>,
}

pub struct Datapath {
    // Field order is drop order: links detach before the object that owns the programs goes.
    _links: Vec<(&'static str, Link)>,
    /// Inbound steering: `sk_lookup` on each enrolled pod's namespace.
    steering: steer::Steering,
    pods: HashMap<MapData, u64, PodConfig>,
    stats: PerCpuHashMap<MapData, u64, PodStats>,
    /// Each pod's live entries against its quotas (`SM_POD_QUOTA`).
    quotas: HashMap<MapData, u64, PodQuota>,
    /// `--pod-inbound-binds`: also how many servers listening before enrolment are captured.
    bind_quota: u32,
    pub maps: Arc<KernelMaps>,
    events: Option<RingBuf<MapData>>,
    /// The observability maps the agent writes (taken by the app at start).
    sink: Option<sink::Sink>,
    heartbeat: Option<heartbeat::Heartbeat>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    _ebpf: Ebpf,
    dir: PathBuf,
    keep_pins: bool,
    _lock: PinDirLock,
}

impl Datapath {
    /// Load, pin and attach. On error everything done so far is undone by the drops (links
    /// detach when their fd closes) and by removing pins this call created. `handed_lock` is
    /// the pin-dir lock of a running agent this one takes over from: its pods stay in
    /// `SM_PODS` (still captured, by the listeners both agents share) instead of being
    /// forgotten as a dead agent's.
    pub fn start(opts: &DatapathOptions, handed_lock: Option<PinDirLock>) -> Result<Datapath> {
        let takeover = handed_lock.is_some();
        let lock = match handed_lock {
            Some(l) => l,
            None => preflight::lock_pin_dir(opts.bpffs_dir)?,
        };
        let dir = opts.bpffs_dir.to_path_buf();
        let existed = dir.exists();
        if existed {
            check_pinned_schema(&dir)?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let result = Self::start_in(opts, lock, &dir, existed, takeover);
        if result.is_err() && !existed {
            remove_pins(&dir);
        }
        result
    }

    fn start_in(
        opts: &DatapathOptions,
        lock: PinDirLock,
        dir: &Path,
        existed: bool,
        takeover: bool,
    ) -> Result<Datapath> {
        // aya-log's level filter lives in the object: 0 turns every kernel log call off.
        let log_level: u8 = if opts.kernel_log {
            aya_log::Level::Debug as u8
        } else {
            0
        };
        // Before the object: its definition of this map takes the pinned one (see sockstore).
        sockstore::ensure_pinned(dir)?;
        let fast_sockets = capacity::fast_sockets(dir, opts.fast_sockets, takeover)?;
        let mut ebpf = object::loader(dir)
            .map_max_entries(map_names::FAST_SOCKETS, fast_sockets)
            .override_global("AYA_LOG_LEVEL", &log_level, false)
            .load(crate::EBPF_OBJECT)
            .context("load the kernel programs")?;
        let logger = if opts.kernel_log {
            Some(aya_log::EbpfLogger::init(&mut ebpf).context("start the kernel log reader")?)
        } else {
            None
        };

        let config: Array<MapData, GlobalConfig> = take(&mut ebpf, map_names::CONFIG)?;
        let mut pods: HashMap<MapData, u64, PodConfig> = take(&mut ebpf, map_names::PODS)?;
        // Pods enrolled by a previous agent that died are not ours to redirect. On a takeover
        // the previous agent lives and serves them: they stay until this one enrols its own.
        if !takeover {
            let stale: Vec<u64> = pods.keys().filter_map(|k| k.ok()).collect();
            for k in stale {
                let _ = pods.remove(&k);
            }
        }
        // Before any socket the programs could capture is made (upstream sockets come later).
        owned::AgentSockets::install(&mut ebpf, takeover)?;
        let gc = GlobalConfig {
            schema_version: SCHEMA_VERSION,
            agent_mark: opts.mark,
            outbound_port: opts.outbound_port,
            dns_port: opts.dns_port,
            flags: if opts.deny_raw_sockets {
                config_flags::DENY_RAW_SOCKETS
            } else {
                0
            },
            inbound_port: opts.inbound_port,
            _pad: 0,
            _pad2: 0,
            heartbeat_ns: 0,
            fail_open_after_ns: heartbeat::bound_ns(opts.fail_open_after),
            pod_origin_quota: opts.pod_origin_quota,
            pod_dns_quota: opts.pod_dns_quota,
            pod_bind_quota: opts.pod_bind_quota,
            pod_fast_quota: opts.pod_fast_quota,
        };
        // Fresh from the first write, so pods are captured while the task gets going.
        let heartbeat = heartbeat::Heartbeat::new(config, gc)?;

        let cgroup = File::open(opts.cgroup_root)
            .with_context(|| format!("open cgroup {}", opts.cgroup_root.display()))?;
        let mut links = Vec::new();
        // Off by default, and then not attached at all: socket() pays nothing for it.
        let sock_create = opts
            .deny_raw_sockets
            .then_some((prog::SOCK_CREATE, at::BPF_CGROUP_INET_SOCK_CREATE));
        for (name, attach_type) in sock_create.into_iter().chain(PROGRAMS) {
            let program = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing"))?;
            let link =
                attach(program, &cgroup, attach_type).with_context(|| format!("attach {name}"))?;
            links.push((name, link));
        }
        // Links a dead agent left pinned go only now, so there is no moment without programs.
        if existed {
            let old = dir.join("links");
            if old.exists() {
                warn!(dir = %old.display(), "removing links pinned by a previous agent");
                let _ = std::fs::remove_dir_all(&old);
            }
        }
        if opts.keep_pins {
            let ldir = dir.join("links");
            std::fs::create_dir_all(&ldir)?;
            for (name, link) in &links {
                link.pin(&ldir.join(name))
                    .with_context(|| format!("pin link {name}"))?;
            }
        }

        let steering = steer::Steering::new(&mut ebpf, dir)?;
        let stats = take(&mut ebpf, map_names::POD_STATS)?;
        let quotas = take(&mut ebpf, map_names::POD_QUOTA)?;
        let maps = Arc::new(KernelMaps {
            inbound_peers: Mutex::new(take(&mut ebpf, map_names::INBOUND_PEERS)?),
            dns_origins: Mutex::new(take(&mut ebpf, map_names::DNS_ORIGINS)?),
            verdicts: verdicts::Verdicts::new(
                take(&mut ebpf, map_names::VERDICTS)?,
                // A second handle on the pinned map (inbound steering owns the object's).
                stats::open(dir, map_names::FAST_SOCKETS)?.try_into()?,
            ),
            direct_bytes: direct_bytes::DirectBytes::open(dir)?,
            endpoints: endpoints::KernelEndpoints::new(
                take(&mut ebpf, map_names::ENDPOINTS)?,
                take(&mut ebpf, map_names::ENDPOINT_RESULTS)?,
            ),
            relay: match opts.kernel_relay {
                relay::Mode::Off => None,
                mode => Some(relay::RelayMaps::attach(&mut ebpf, mode)?),
            },
        });
        let events = Some(take(&mut ebpf, map_names::EVENTS)?);
        let sink = Some(sink::Sink::take(&mut ebpf)?);
        info!(dir = %dir.display(), cgroup = %opts.cgroup_root.display(), programs = links.len(), "kernel programs attached");
        Ok(Datapath {
            _links: links,
            steering,
            pods,
            stats,
            quotas,
            bind_quota: opts.pod_bind_quota,
            maps,
            events,
            sink,
            heartbeat: Some(heartbeat),
            logger,
            _ebpf: ebpf,
            dir: dir.to_path_buf(),
            keep_pins: opts.keep_pins,
            _lock: lock,
        })
    }

    /// Hand the pod's inbound connections to `listeners` (its inbound listeners, already
    /// serving) once it is enrolled: attaches `sk_lookup` to its namespace. Call before
    /// [`Datapath::enrol`]; [`Datapath::unenrol`] undoes it.
    pub fn steer(
        &mut self,
        netns_cookie: u64,
        netns: std::os::fd::BorrowedFd<'_>,
        listeners: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<()> {
        self.steering.attach(netns_cookie, netns, listeners)
    }

    /// Record the wildcard bind of a socket that was listening before its pod was enrolled
    /// (see [`steer::Steering::record_bind`]).
    pub fn record_bind(&mut self, pod: u64, port: steer::BoundPort, socket: u64) -> bool {
        self.steering.record_bind(pod, port, socket)
    }

    /// How many of a pod's servers listening before its enrolment are captured at most: as
    /// many as its bind quota (0: all). The bind hook counts only its own binds (the agent
    /// cannot add to the kernel's counts without racing its atomic adds), so this bounds the
    /// rest: a pod holds at most twice its quota of `SM_IN_BINDS` entries.
    pub fn found_bind_quota(&self) -> usize {
        match self.bind_quota {
            0 => usize::MAX,
            n => n as usize,
        }
    }

    /// Undo [`Datapath::record_bind`] for a socket found gone.
    pub fn forget_bind(&mut self, pod: u64, port: steer::BoundPort, socket: u64) {
        self.steering.forget_bind(pod, port, socket);
    }

    /// Undo [`Datapath::steer`] for a pod that could not be enrolled.
    pub fn unsteer(&mut self, netns_cookie: u64) {
        self.steering.detach(netns_cookie);
    }

    /// The ports apps of enrolled pods hold wildcard binds of, by pod (`SM_IN_BINDS`).
    pub fn bound_ports(&self) -> std::collections::HashMap<u64, Vec<steer::BoundPort>> {
        self.steering.bound_ports()
    }

    /// Start redirecting a pod's sockets. Call only once its listeners are open.
    pub fn enrol(&mut self, netns_cookie: u64, cfg: PodConfig) -> Result<()> {
        // Counters survive re-enrolment (and agent restarts, the map being pinned).
        if self.stats.get(&netns_cookie, 0).is_err() {
            let zeros = PerCpuValues::try_from(vec![PodStats::default(); nr_cpus()?])?;
            self.stats
                .insert(netns_cookie, zeros, 0)
                .context("create the pod's counters")?;
        }
        // Its count of live entries against its quotas: kept if there (a re-enrolment or a
        // restart on the same pins), since the entries it counts are still there too.
        if self.quotas.get(&netns_cookie, 0).is_err() {
            self.quotas
                .insert(netns_cookie, PodQuota::default(), 0)
                .context("create the pod's quota counts")?;
        }
        self.pods
            .insert(netns_cookie, cfg, 0)
            .context("enrol pod in SM_PODS")?;
        Ok(())
    }

    /// Stop redirecting a pod's new sockets and steering its inbound connections.
    pub fn unenrol(&mut self, netns_cookie: u64) {
        let _ = self.pods.remove(&netns_cookie);
        self.steering.detach(netns_cookie);
    }

    /// Drop a removed pod's counters: pods come and go under Kubernetes, and the counters map
    /// is bounded. (At shutdown they stay, for `sockmesh stats` after the agent is gone.)
    pub fn forget_pod(&mut self, netns_cookie: u64) {
        let _ = self.stats.remove(&netns_cookie);
        let _ = self.quotas.remove(&netns_cookie);
    }

    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    pub fn take_sink(&mut self) -> Option<sink::Sink> {
        self.sink.take()
    }

    /// The `SM_CONFIG` writer, for the heartbeat task.
    pub fn take_heartbeat(&mut self) -> Option<heartbeat::Heartbeat> {
        self.heartbeat.take()
    }

    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    /// Stop redirecting every pod this map holds (new connections go direct).
    pub fn unenrol_all(&mut self) {
        let cookies: Vec<u64> = self.pods.keys().filter_map(|k| k.ok()).collect();
        for c in cookies {
            self.unenrol(c);
        }
    }

    /// Stop redirecting pods a replaced agent enrolled that this one does not serve.
    pub fn unenrol_except(&mut self, keep: &[u64]) {
        let cookies: Vec<u64> = self.pods.keys().filter_map(|k| k.ok()).collect();
        for c in cookies.into_iter().filter(|c| !keep.contains(c)) {
            self.unenrol(c);
        }
    }

    /// Let go without touching what a successor now uses: no unenrolment, no pin removed.
    /// This agent's own links detach when their fds close (unless pinned by the successor,
    /// which pins its own).
    pub fn release(self) {
        info!(dir = %self.dir.display(), "handed over: pins and pods left to the successor");
    }

    /// The pin-dir lock, shared with a successor (a flock belongs to the open file).
    pub fn lock_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self._lock.as_fd()
    }

    /// Detach (unless pins are kept) and remove the pins this agent owns. Call
    /// [`Datapath::unenrol_all`] first, before the listeners close.
    pub fn shutdown(self) {
        let dir = self.dir.clone();
        let keep = self.keep_pins;
        drop(self);
        if !keep {
            remove_pins(&dir);
            info!(dir = %dir.display(), "programs detached and pins removed");
        } else {
            info!(dir = %dir.display(), "pins kept: programs stay attached");
        }
    }
}

/// Load a program (the verifier runs here) and attach it at the cgroup as a link.
fn attach(program: &mut Program, cgroup: &File, attach_type: at) -> Result<Link> {
    match program {
        Program::CgroupSockAddr(p) => p.load()?,
        Program::SockOps(p) => p.load()?,
        Program::CgroupSockopt(p) => p.load()?,
        Program::CgroupSock(p) => p.load()?,
        other => bail!("unexpected program type {:?}", other.prog_type()),
    }
    let fd = program.fd()?;
    Ok(Link::create(
        fd.as_fd(),
        cgroup.as_fd(),
        attach_type as u32,
    )?)
}

/// Pins from another schema cannot be reused: say so rather than misread them.
fn check_pinned_schema(dir: &Path) -> Result<()> {
    let path = dir.join(map_names::CONFIG);
    if !path.exists() {
        return Ok(());
    }
    let Ok(cfg) = stats::read_config(dir) else {
        return Ok(());
    };
    if cfg.schema_version != 0 && cfg.schema_version != SCHEMA_VERSION {
        bail!(
            "{} holds maps of schema version {} but this agent uses {}: remove the directory (rm -r {}) to start fresh",
            dir.display(),
            cfg.schema_version,
            SCHEMA_VERSION,
            dir.display()
        );
    }
    Ok(())
}

fn remove_pins(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir.join("links"));
    for name in map_names::ALL
        .into_iter()
        .chain(sockmesh_common::peer::map_names::ALL)
    {
        let _ = std::fs::remove_file(dir.join(name));
    }
    // aya-log's own map is pinned too when present.
    let _ = std::fs::remove_file(dir.join("AYA_LOGS"));
    if let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(dir = %dir.display(), error = %e, "could not remove the pin directory");
        }
    }
}

pub fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(_, e)| anyhow!("count possible CPUs: {e}"))
}
