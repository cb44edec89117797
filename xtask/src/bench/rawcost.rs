//! The cost of `--deny-raw-sockets` (the README's figure): socket()+close() pairs per second
//! in an enrolled pod with the option (the `cgroup/sock_create` program attached) and without
//! it (not attached), in rounds ordered without, with, with, without, ... so a drift of the
//! machine's speed cancels out. Each pair of neighbouring rounds gives a ratio; the median
//! ratio is the figure. Its own small cluster, so it needs none of the bench's topology.
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sockmesh_tests::{pod_spec, Agent, Cluster, Pod};

pub struct RawCost {
    pub without_per_sec: f64,
    pub with_per_sec: f64,
    pub ratio: f64,
}

/// `pairs` pairs of rounds of `secs` each (at least 1 pair).
pub fn measure(pairs: usize, secs: f64) -> Result<RawCost> {
    let cluster = Cluster::new().context("cluster for the raw-socket cost")?;
    let pod = cluster.add_pod("rawcost").context("pod")?;
    let mut rounds: Vec<(bool, f64)> = Vec::new();
    for round in 0..pairs.max(1) * 2 {
        // ABBA: without, with, with, without, without, with, ...
        let deny = matches!(round % 4, 1 | 2);
        let mut args = vec!["--pod".to_string(), pod_spec(&pod, "")];
        if deny {
            args.push("--deny-raw-sockets".into());
        }
        let mut agent = Agent::start(&args).context("start the agent")?;
        agent.wait_ready().context("agent ready")?;
        rounds.push((deny, sockets_per_second(&pod, secs)?));
        if !agent.stop().context("stop the agent")?.success() {
            bail!("the agent did not stop cleanly");
        }
    }
    let ratios: Vec<f64> = rounds
        .chunks(2)
        .map(|p| {
            let (with, without) = if p[0].0 {
                (p[0].1, p[1].1)
            } else {
                (p[1].1, p[0].1)
            };
            with / without
        })
        .collect();
    let pick = |d: bool| rounds.iter().filter(|r| r.0 == d).map(|r| r.1).collect();
    Ok(RawCost {
        without_per_sec: median(pick(false)),
        with_per_sec: median(pick(true)),
        ratio: median(ratios),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// socket()+close() pairs per second in `pod`, over `secs`.
fn sockets_per_second(pod: &Pod, secs: f64) -> Result<f64> {
    pod.run(move || -> std::io::Result<f64> {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            for _ in 0..1000 {
                drop(socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::STREAM,
                    None,
                )?);
            }
            n += 1000;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    })
    .context("socket() in the pod")
}
