//! Fail open. The agent sits in the data path of every enrolled pod, so it must never be why a
//! pod cannot talk: a task in the agent's runtime rewrites a timestamp in `SM_CONFIG`, and the
//! capturing programs stop redirecting once it is older than `--fail-open-after`. A killed agent
//! (kill -9 with pinned links) or a hung runtime stops the beats, so new connections go direct;
//! an agent that comes back beats again and captures again.
//!
//! The clock is CLOCK_MONOTONIC on both sides (`bpf_ktime_get_ns` in the kernel).
use std::time::Duration;

use anyhow::{Context, Result};
use aya::maps::{Array, MapData};
use sockmesh_common::GlobalConfig;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::sys::clock::monotonic_ns;

/// The shortest `--fail-open-after`: a bound below a few heartbeats would fail open on any
/// scheduling hiccup of a busy node.
pub const MIN_FAIL_OPEN: Duration = Duration::from_millis(500);

/// How often to beat: four beats per bound, so one or two late beats never fail a pod open,
/// between 125 ms (the bound's floor / 4) and 500 ms (cheap: one map write).
pub fn period(fail_open_after: Option<Duration>) -> Duration {
    let max = Duration::from_millis(500);
    match fail_open_after {
        Some(d) => (d / 4).clamp(MIN_FAIL_OPEN / 4, max),
        None => max,
    }
}

/// `--fail-open-after` as the kernel reads it: 0 is "never".
pub fn bound_ns(fail_open_after: Option<Duration>) -> u64 {
    fail_open_after.map_or(0, |d| d.as_nanos().clamp(1, u64::MAX as u128) as u64)
}

/// Rejects a bound too short to survive normal scheduling delays.
pub fn validate(fail_open_after: Option<Duration>) -> Result<(), String> {
    match fail_open_after {
        Some(d) if d < MIN_FAIL_OPEN => Err(format!(
            "--fail-open-after {d:?} is too short: use at least {MIN_FAIL_OPEN:?} (the heartbeat is written every 125-500 ms), or off"
        )),
        _ => Ok(()),
    }
}

/// The writer of `SM_CONFIG[0]`, owned by the heartbeat task.
pub struct Heartbeat {
    map: Array<MapData, GlobalConfig>,
    cfg: GlobalConfig,
}

impl Heartbeat {
    /// Writes the whole config with a fresh heartbeat, before any program is attached.
    pub fn new(map: Array<MapData, GlobalConfig>, cfg: GlobalConfig) -> Result<Self> {
        let mut hb = Heartbeat { map, cfg };
        hb.beat().context("write SM_CONFIG")?;
        Ok(hb)
    }

    /// One beat. The other fields are rewritten unchanged, so a reader that sees a torn write
    /// still reads the same config.
    pub fn beat(&mut self) -> Result<(), aya::maps::MapError> {
        self.cfg.heartbeat_ns = monotonic_ns();
        self.map.set(0, self.cfg, 0)
    }

    /// Beat every `period` until cancelled. A failed write is reported once per run of
    /// failures; the pods fail open meanwhile, which is the safe side.
    pub async fn run(mut self, period: Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(period);
        // After a stall, one beat is enough: a burst of catch-up writes says nothing more.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.beat() {
                Ok(()) if failing => {
                    failing = false;
                    debug!("heartbeat written again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    warn!(error = %e, "cannot write the heartbeat: pods fail open until it works");
                }
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_is_a_quarter_of_the_bound_within_limits() {
        assert_eq!(
            period(Some(Duration::from_secs(2))),
            Duration::from_millis(500)
        );
        assert_eq!(
            period(Some(Duration::from_secs(1))),
            Duration::from_millis(250)
        );
        assert_eq!(
            period(Some(Duration::from_millis(500))),
            Duration::from_millis(125)
        );
        assert_eq!(
            period(Some(Duration::from_secs(60))),
            Duration::from_millis(500)
        );
        assert_eq!(period(None), Duration::from_millis(500));
    }

    #[test]
    fn bound_in_kernel_nanoseconds_with_off_as_zero() {
        assert_eq!(bound_ns(None), 0);
        assert_eq!(bound_ns(Some(Duration::from_secs(2))), 2_000_000_000);
        assert_eq!(bound_ns(Some(Duration::from_secs(u64::MAX))), u64::MAX);
    }

    #[test]
    fn too_short_a_bound_is_refused_with_the_fix() {
        let e = validate(Some(Duration::from_millis(100))).unwrap_err();
        assert!(
            e.contains("--fail-open-after") && e.contains("at least 500ms"),
            "{e}"
        );
        assert!(validate(Some(MIN_FAIL_OPEN)).is_ok());
        assert!(validate(None).is_ok());
    }
}
