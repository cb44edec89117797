//! Hostile pod annotations, property-tested. Pod owners write annotations, and the agent of
//! every node reads them: arbitrary values (any characters, any length, on the keys sockmesh
//! reads and on others) never panic the decision, a malformed one is one clear problem naming
//! its key (one line, whatever the value holds) and the pod is meshed with none of its
//! options, and well-formed lists round-trip to exactly the options they write.
use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use proptest::prelude::*;
use serde_json::json;
use sockmesh_common::{MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS};

use super::decide::{
    decide, Decision, PodOptions, EXCLUDE_INBOUND_PORTS, EXCLUDE_OUTBOUND_CIDRS,
    EXCLUDE_OUTBOUND_PORTS, MESH, POLICY_PROFILE,
};
use crate::spec::{CidrSpec, PortRangeSpec, SHOWN_MAX};
use crate::testkit::config;

const NODE: &str = "node-a";
const KEYS: [&str; 5] = [
    MESH,
    EXCLUDE_OUTBOUND_PORTS,
    EXCLUDE_OUTBOUND_CIDRS,
    EXCLUDE_INBOUND_PORTS,
    POLICY_PROFILE,
];

fn pod(annotations: &BTreeMap<String, String>) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "shop", "uid": "5e3bd4a2-9c1f-4b7e-8f00-0123456789ab",
                     "annotations": annotations},
        "spec": {"nodeName": NODE, "containers": [{"name": "app"}]},
        "status": {"phase": "Running"},
    }))
    .expect("pod JSON")
}

/// Values a hostile owner might write: anything, near-misses of the syntax, and long ones.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9;,\\- ]{0,40}",
        "[0-9a-f.:/;, ]{0,60}",
        "[a-z0-9.\\-]{0,70}",
        Just("enabled".to_string()),
        Just("disabled".to_string()),
        (any::<char>(), 1000usize..5000).prop_map(|(c, n)| c.to_string().repeat(n)),
    ]
}

fn annotations() -> impl Strategy<Value = BTreeMap<String, String>> {
    let key = prop_oneof![
        4 => proptest::sample::select(KEYS.to_vec()).prop_map(String::from),
        1 => any::<String>(),
    ];
    proptest::collection::btree_map(key, value(), 0..7)
}

fn port_range() -> impl Strategy<Value = PortRangeSpec> {
    (1u16..=65535, 1u16..=65535).prop_map(|(a, b)| PortRangeSpec {
        lo: a.min(b),
        hi: a.max(b),
    })
}

fn cidr() -> impl Strategy<Value = CidrSpec> {
    prop_oneof![
        (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, p)| CidrSpec {
            addr: IpAddr::from(a),
            prefix: p
        }),
        (any::<[u8; 16]>(), 0u8..=128).prop_map(|(a, p)| CidrSpec {
            addr: IpAddr::from(a),
            prefix: p
        }),
    ]
}

/// A list as an owner would write it: `;` or `,` between entries, spaces around them.
fn written<T>(items: &[T], show: impl Fn(&T) -> String, sep: &str) -> String {
    items
        .iter()
        .map(|i| format!(" {} ", show(i)))
        .collect::<Vec<_>>()
        .join(sep)
}

fn show_range(r: &PortRangeSpec) -> String {
    if r.lo == r.hi {
        r.lo.to_string()
    } else {
        format!("{}-{}", r.lo, r.hi)
    }
}

proptest! {
    #![proptest_config(config())]

    /// Never a panic; problems name a key sockmesh reads, in one line that shows at most a
    /// bounded part of the value; an options problem leaves the pod with no options at all.
    #[test]
    fn arbitrary_annotations_never_panic_and_fail_cleanly(ann in annotations()) {
        let (decision, problems) = decide(&pod(&ann), None, NODE, |_| Ok(()));
        prop_assert!(problems.len() <= 2, "{problems:?}");
        for p in &problems {
            prop_assert!(KEYS.contains(&p.key), "{p:?}");
            prop_assert!(!p.message.is_empty());
            prop_assert!(!p.message.chars().any(char::is_control), "not one line: {:?}", p.message);
            // At most SHOWN_MAX characters of the value, each escaped into at most 10.
            prop_assert!(p.message.chars().count() < SHOWN_MAX * 10 + 200, "{} chars", p.message.len());
        }
        let option_problem = problems.iter().any(|p| p.key != MESH);
        if let Decision::Enrol { name, options } = decision {
            if option_problem {
                prop_assert_eq!(options, PodOptions::default(), "never half the options");
                prop_assert_eq!(name, "shop/web-1");
            }
        }
    }

    /// Well-formed exclusions and profiles come back exactly as written, whichever separator
    /// and spacing; the pod is enrolled with them and nothing is reported.
    #[test]
    fn written_options_round_trip(
        out_ports in proptest::collection::vec(port_range(), 0..=MAX_EXCLUDED_PORTS),
        in_ports in proptest::collection::vec(port_range(), 0..=MAX_EXCLUDED_PORTS),
        cidrs in proptest::collection::vec(cidr(), 0..=MAX_EXCLUDED_CIDRS),
        profile in proptest::option::of("[a-z0-9][a-z0-9.\\-]{0,62}"),
        sep in prop_oneof![Just(";"), Just(",")],
    ) {
        let mut ann = BTreeMap::new();
        ann.insert(MESH.to_string(), "enabled".to_string());
        ann.insert(EXCLUDE_OUTBOUND_PORTS.to_string(), written(&out_ports, show_range, sep));
        ann.insert(EXCLUDE_INBOUND_PORTS.to_string(), written(&in_ports, show_range, sep));
        ann.insert(
            EXCLUDE_OUTBOUND_CIDRS.to_string(),
            written(&cidrs, |c| format!("{}/{}", c.addr, c.prefix), sep),
        );
        if let Some(p) = &profile {
            ann.insert(POLICY_PROFILE.to_string(), p.clone());
        }
        let (decision, problems) = decide(&pod(&ann), None, NODE, |_| Ok(()));
        prop_assert!(problems.is_empty(), "{problems:?}");
        let want = PodOptions {
            exclude_outbound_ports: out_ports,
            exclude_outbound_cidrs: cidrs,
            exclude_inbound_ports: in_ports,
            profile: profile.clone(),
        };
        let name = match &profile {
            Some(p) => format!("@{p}/shop/web-1"),
            None => "shop/web-1".to_string(),
        };
        prop_assert_eq!(decision, Decision::Enrol { name, options: want });
    }

    /// The operator's allowed set only ever removes options: a refused pod is meshed with
    /// none of them, and the problem is the one the check gave.
    #[test]
    fn a_refusal_drops_every_option(ann in annotations()) {
        let refuse = |_: &PodOptions| Err(super::decide::Problem {
            key: POLICY_PROFILE,
            message: "is not allowed on this node".into(),
        });
        let (decision, problems) = decide(&pod(&ann), None, NODE, refuse);
        if let Decision::Enrol { options, .. } = decision {
            prop_assert_eq!(options, PodOptions::default());
            prop_assert!(problems.iter().any(|p| p.key != MESH), "{problems:?}");
        }
    }
}
