//! When the agent next needs to look at a pod's direct connections for the idle timeout.
//!
//! Listing a pod's connections (sock_diag with `tcp_info`) costs in proportion to how many it
//! has: with 100,000 idle direct connections a listing every second would cost the agent a
//! steady share of a core to find nothing, since idle timeouts are long (1 h by default).
//! A listing says how long each connection has been idle, and idleness only grows by the
//! clock: none of them can pass its peer's timeout before `timeout - idle`, and a connection
//! opened later not before the shortest timeout. So each pod is listed again only then (or at
//! once when its kernel-tier peers or their timeouts change), and a connection is still closed
//! within one sweep tick of passing its timeout. Pure: the owner passes `now`.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::clock::Nanos;

/// A pod's kernel-tier peers with an idle timeout, and each one's timeout.
pub type Timeouts = HashMap<SocketAddr, Duration>;

struct Next {
    at: Nanos,
    /// The timeouts that sweep was made for: any change calls for a sweep now.
    timeouts: Timeouts,
}

/// The next sweep of each pod, by netns cookie.
#[derive(Default)]
pub struct IdleSchedule {
    pods: HashMap<u64, Next>,
}

impl IdleSchedule {
    /// Whether `pod`, whose kernel-tier peers now have `timeouts`, needs a listing at `now`.
    pub fn due(&self, pod: u64, timeouts: &Timeouts, now: Nanos) -> bool {
        match self.pods.get(&pod) {
            Some(n) => now >= n.at || n.timeouts != *timeouts,
            None => true,
        }
    }

    /// `pod` was listed at `now` (for `timeouts`); the next listing is due after `wait`.
    pub fn swept(&mut self, pod: u64, timeouts: Timeouts, now: Nanos, wait: Duration) {
        let at = now.saturating_add(wait);
        self.pods.insert(pod, Next { at, timeouts });
    }

    /// Forgets pods for which `keep` is false (gone, or with no kernel-tier timeouts left).
    pub fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        self.pods.retain(|pod, _| keep(*pod));
    }
}

/// Collects what one listing says about when to look next: the soonest a connection seen
/// below its timeout, or one not yet open, can pass it.
pub struct NextSweep<'a> {
    timeouts: &'a Timeouts,
    wait: Duration,
}

impl<'a> NextSweep<'a> {
    pub fn new(timeouts: &'a Timeouts) -> Self {
        let shortest = timeouts.values().copied().min().unwrap_or(Duration::MAX);
        NextSweep {
            timeouts,
            wait: shortest,
        }
    }

    /// One listed connection to `remote`, idle for `idle`: true if it is past its peer's
    /// timeout (to be closed if direct). One still below it brings the next sweep forward to
    /// when it could pass it.
    pub fn see(&mut self, remote: &SocketAddr, idle: Duration) -> bool {
        let Some(&t) = self.timeouts.get(remote) else {
            return false;
        };
        if idle >= t {
            return true;
        }
        self.wait = self.wait.min(t - idle);
        false
    }

    /// How long until the next sweep of the pod is due.
    pub fn wait(&self) -> Duration {
        self.wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> Nanos {
        Nanos::from_duration(Duration::from_secs(secs))
    }

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn the_next_sweep_is_when_the_first_connection_could_pass_its_timeout() {
        let t: Timeouts = [
            (peer(1), Duration::from_secs(60)),
            (peer(2), Duration::from_secs(10)),
        ]
        .into();
        let mut n = NextSweep::new(&t);
        assert_eq!(
            n.wait(),
            Duration::from_secs(10),
            "a new connection to peer 2"
        );
        assert!(!n.see(&peer(1), Duration::from_secs(55)));
        assert_eq!(n.wait(), Duration::from_secs(5));
        assert!(n.see(&peer(2), Duration::from_secs(10)), "past its timeout");
        assert!(
            !n.see(&peer(9), Duration::from_secs(999)),
            "not a kernel-tier peer"
        );
        assert_eq!(
            n.wait(),
            Duration::from_secs(5),
            "closed ones do not bring it forward"
        );
        assert_eq!(NextSweep::new(&Timeouts::new()).wait(), Duration::MAX);
    }

    #[test]
    fn a_pod_is_due_at_its_time_or_when_its_timeouts_change() {
        let t: Timeouts = [(peer(1), Duration::from_secs(3600))].into();
        let mut s = IdleSchedule::default();
        assert!(s.due(7, &t, Nanos::ZERO), "never listed");
        s.swept(7, t.clone(), at(5), Duration::from_secs(3600));
        assert!(!s.due(7, &t, at(6)));
        assert!(!s.due(7, &t, at(3604)));
        assert!(s.due(7, &t, at(3605)));
        let shorter: Timeouts = [(peer(1), Duration::from_secs(2))].into();
        assert!(s.due(7, &shorter, at(6)), "a reload changed the timeout");
        let more: Timeouts = [
            (peer(1), Duration::from_secs(3600)),
            (peer(2), Duration::from_secs(3600)),
        ]
        .into();
        assert!(s.due(7, &more, at(6)), "a peer joined the kernel tier");
        s.swept(7, t.clone(), at(5), Duration::MAX);
        assert!(
            !s.due(7, &t, Nanos(u64::MAX - 1)),
            "saturates instead of wrapping"
        );
        s.retain(|p| p != 7);
        assert!(s.due(7, &t, at(6)), "forgotten");
    }
}
