//! The two tiers a peer's policy runs on (README, "Two tiers: the kernel fast path").
//!
//! The agent's default is `--fast-path auto`, and so is every test's: an agent started
//! without a tier flag is what users get. A test that measures the proxy itself pins
//! [`Tier::Proxy`] with a one-line reason at the pin; a test whose figures or outcomes
//! differ by tier runs on both, each tier's expectation written out.

use crate::agent::{pod_spec, Agent};
use crate::pod::Pod;

/// On the kernel tier (`--fast-path auto`) a peer whose policy the kernel enforces is handed
/// over after its first proxied connection, and later connect()s to it are policed in the
/// kernel and go direct; on the proxy tier (`--fast-path off`) every connection is proxied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Proxy,
    Kernel,
}

impl Tier {
    pub const BOTH: [Tier; 2] = [Tier::Proxy, Tier::Kernel];

    pub fn flags(self) -> [&'static str; 2] {
        match self {
            Tier::Proxy => ["--fast-path", "off"],
            Tier::Kernel => ["--fast-path", "auto"],
        }
    }

    /// `extra` plus this tier's flag, as `sockmesh run` arguments.
    pub fn args<'a>(self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = extra.to_vec();
        args.extend(self.flags());
        args
    }

    /// Starts an agent enrolling `pod` on this tier, plus `extra`, and waits until it is ready.
    pub fn agent(self, pod: &Pod, extra: &[&str]) -> Agent {
        let spec = pod_spec(pod, "");
        let mut args = vec!["--pod", spec.as_str()];
        args.extend_from_slice(extra);
        let agent = Agent::start(self.args(&args)).expect("agent");
        agent.wait_ready().expect("ready");
        agent
    }
}
