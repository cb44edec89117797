//! What pods may ask for by annotation: the operator decides (`--allow-pod-exclude-ports`,
//! `--allow-pod-exclude-cidrs`, `--allow-pod-profiles`), not the pod's owner. An exclusion is
//! a hole in the mesh (no policy, no counters) and a profile picks the pod's policy, so by
//! default a pod may ask for neither; an annotation beyond what is allowed is refused like a
//! malformed one (a Warning Event, and the pod is meshed with none of its annotations'
//! options).
use clap::Args;

use super::decide::{
    PodOptions, Problem, EXCLUDE_INBOUND_PORTS, EXCLUDE_OUTBOUND_CIDRS, EXCLUDE_OUTBOUND_PORTS,
    POLICY_PROFILE,
};
use crate::spec::{CidrSpec, PortRangeSpec};

/// A list the operator allows, or `any`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allow<T> {
    Any,
    Only(Vec<T>),
}

impl<T> Allow<T> {
    fn parse(s: &str, item: impl Fn(&str) -> Result<Vec<T>, String>) -> Result<Self, String> {
        match s.trim() {
            "any" => Ok(Allow::Any),
            "none" | "" => Ok(Allow::Only(Vec::new())),
            list => item(list).map(Allow::Only),
        }
    }
}

fn ports(s: &str) -> Result<Allow<PortRangeSpec>, String> {
    Allow::parse(s, PortRangeSpec::parse_list)
}

fn cidrs(s: &str) -> Result<Allow<CidrSpec>, String> {
    Allow::parse(s, CidrSpec::parse_list)
}

fn profiles(s: &str) -> Result<Allow<String>, String> {
    Allow::parse(s, |l| {
        Ok(l.split([',', ';'])
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect())
    })
}

/// The operator's allowances for pod annotations (Kubernetes mode).
#[derive(Args, Debug, Clone)]
pub struct AllowArgs {
    /// Ports a pod may exclude from capture by annotation (`sockmesh.io/exclude-outbound-ports`
    /// and `-inbound-ports`): each range it names must lie inside one of these (`22,8000-8100`),
    /// or `any`, or `none`.
    #[arg(long, env = "SOCKMESH_ALLOW_POD_EXCLUDE_PORTS", value_name = "PORTS|any|none",
          default_value = "none", value_parser = ports)]
    pub allow_pod_exclude_ports: Allow<PortRangeSpec>,
    /// Destinations a pod may exclude by annotation (`sockmesh.io/exclude-outbound-cidrs`):
    /// each CIDR it names must lie inside one of these (`10.1.0.0/16,fd00::/8`), or `any`, or
    /// `none`.
    #[arg(long, env = "SOCKMESH_ALLOW_POD_EXCLUDE_CIDRS", value_name = "CIDRS|any|none",
          default_value = "none", value_parser = cidrs)]
    pub allow_pod_exclude_cidrs: Allow<CidrSpec>,
    /// Policy profiles a pod may pick by annotation (`sockmesh.io/policy-profile`): names
    /// (`gold,silver`), or `any`, or `none`.
    #[arg(long, env = "SOCKMESH_ALLOW_POD_PROFILES", value_name = "NAMES|any|none",
          default_value = "none", value_parser = profiles)]
    pub allow_pod_profiles: Allow<String>,
}

impl AllowArgs {
    /// The first option of `o` the operator does not allow, as a [`Problem`].
    pub fn check(&self, o: &PodOptions) -> Result<(), Problem> {
        let refused = |key: &'static str, what: String, flag: &str| Problem {
            key,
            message: format!("{what} is not allowed on this node (the operator's {flag})"),
        };
        if let Allow::Only(ok) = &self.allow_pod_exclude_ports {
            for (key, list) in [
                (EXCLUDE_OUTBOUND_PORTS, &o.exclude_outbound_ports),
                (EXCLUDE_INBOUND_PORTS, &o.exclude_inbound_ports),
            ] {
                if let Some(r) = list.iter().find(|r| !ok.iter().any(|a| a.covers(r))) {
                    let what = format!("port {}", show_range(r));
                    return Err(refused(key, what, "--allow-pod-exclude-ports"));
                }
            }
        }
        if let Allow::Only(ok) = &self.allow_pod_exclude_cidrs {
            let list = &o.exclude_outbound_cidrs;
            if let Some(c) = list.iter().find(|c| !ok.iter().any(|a| a.covers(c))) {
                let what = format!("{}/{}", c.addr, c.prefix);
                return Err(refused(
                    EXCLUDE_OUTBOUND_CIDRS,
                    what,
                    "--allow-pod-exclude-cidrs",
                ));
            }
        }
        if let (Allow::Only(ok), Some(p)) = (&self.allow_pod_profiles, &o.profile) {
            if !ok.contains(p) {
                let what = format!("profile '{p}'");
                return Err(refused(POLICY_PROFILE, what, "--allow-pod-profiles"));
            }
        }
        Ok(())
    }
}

fn show_range(r: &PortRangeSpec) -> String {
    if r.lo == r.hi {
        r.lo.to_string()
    } else {
        format!("{}-{}", r.lo, r.hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        allow: AllowArgs,
    }

    fn allow(args: &[&str]) -> AllowArgs {
        let argv = std::iter::once("x").chain(args.iter().copied());
        Cli::try_parse_from(argv).expect("parses").allow
    }

    fn opts(ports: &str, cidrs: &str, profile: Option<&str>) -> PodOptions {
        PodOptions {
            exclude_outbound_ports: PortRangeSpec::parse_list(ports).expect("ports"),
            exclude_outbound_cidrs: CidrSpec::parse_list(cidrs).expect("cidrs"),
            exclude_inbound_ports: vec![],
            profile: profile.map(str::to_string),
        }
    }

    #[test]
    fn by_default_a_pod_may_exclude_nothing_and_pick_no_profile() {
        let a = allow(&[]);
        assert_eq!(
            a.check(&opts("", "", None)),
            Ok(()),
            "no annotation, nothing refused"
        );
        for (o, key, says) in [
            (
                opts("22", "", None),
                EXCLUDE_OUTBOUND_PORTS,
                "port 22 is not allowed",
            ),
            (
                opts("", "0.0.0.0/0", None),
                EXCLUDE_OUTBOUND_CIDRS,
                "0.0.0.0/0 is not allowed",
            ),
            (
                opts("", "", Some("gold")),
                POLICY_PROFILE,
                "profile 'gold' is not allowed",
            ),
        ] {
            let p = a.check(&o).expect_err("refused");
            assert_eq!(p.key, key);
            assert!(p.message.contains(says), "{}", p.message);
        }
    }

    #[test]
    fn what_the_operator_allows_passes_and_nothing_wider() {
        let a = allow(&[
            "--allow-pod-exclude-ports",
            "5432,8000-8100",
            "--allow-pod-exclude-cidrs",
            "10.1.0.0/16",
            "--allow-pod-profiles",
            "gold,silver",
        ]);
        assert_eq!(
            a.check(&opts("5432;8000-8010", "10.1.2.0/24", Some("gold"))),
            Ok(())
        );
        assert!(
            a.check(&opts("8000-8200", "", None)).is_err(),
            "a wider range"
        );
        assert!(
            a.check(&opts("", "10.0.0.0/8", None)).is_err(),
            "a wider CIDR"
        );
        assert!(a.check(&opts("", "", Some("platinum"))).is_err());
        let inbound = PodOptions {
            exclude_inbound_ports: PortRangeSpec::parse_list("9000").expect("port"),
            ..PodOptions::default()
        };
        assert_eq!(
            a.check(&inbound).expect_err("refused").key,
            EXCLUDE_INBOUND_PORTS
        );
        let any = allow(&[
            "--allow-pod-exclude-ports",
            "any",
            "--allow-pod-exclude-cidrs",
            "any",
            "--allow-pod-profiles",
            "any",
        ]);
        assert_eq!(any.check(&opts("1-65535", "0.0.0.0/0", Some("x"))), Ok(()));
    }

    #[test]
    fn bad_allowances_are_flag_errors() {
        for bad in [
            &["--allow-pod-exclude-ports", "http"][..],
            &["--allow-pod-exclude-cidrs", "10.0.0.0/33"],
        ] {
            let argv = std::iter::once("x").chain(bad.iter().copied());
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }
}
