//! `--workload` and `--variant`: which part of the benchmark to run, so one workload can be
//! iterated on in seconds instead of the full five minutes. Parsing is pure and unit-tested;
//! an unknown name is an error that lists the valid ones.

use anyhow::{bail, Result};

use super::plan::Variant;
use super::workloads::Workload;

/// The workloads and variants one run measures, in the canonical order (the report's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    pub workloads: Vec<Workload>,
    pub variants: Vec<Variant>,
}

impl Selection {
    /// From the comma-separated flag values (None: all). Direct is always measured: every
    /// ratio pairs a run with the direct run of the same repetition.
    pub fn parse(workloads: Option<&str>, variants: Option<&str>) -> Result<Self> {
        let workloads = match workloads {
            Some(s) => pick("--workload", s, &Workload::ALL, Workload::flag)?,
            None => Workload::ALL.to_vec(),
        };
        let mut variants = match variants {
            Some(s) => pick("--variant", s, &Variant::ALL, Variant::flag)?,
            None => Variant::DEFAULT.to_vec(),
        };
        if !variants.contains(&Variant::Direct) {
            variants.insert(0, Variant::Direct);
        }
        Ok(Selection {
            workloads,
            variants,
        })
    }
}

/// The members of `all` named in `list` (comma-separated), in `all`'s order, each once.
fn pick<T: Copy + PartialEq>(
    flag: &str,
    list: &str,
    all: &[T],
    name: fn(T) -> &'static str,
) -> Result<Vec<T>> {
    let mut wanted = Vec::new();
    for word in list.split(',').map(str::trim) {
        if word.is_empty() {
            bail!(
                "{flag}: empty name in `{list}` (valid: {})",
                valid(all, name)
            );
        }
        match all.iter().find(|x| name(**x) == word) {
            Some(x) => wanted.push(*x),
            None => bail!(
                "{flag}: unknown name `{word}` (valid: {})",
                valid(all, name)
            ),
        }
    }
    Ok(all.iter().copied().filter(|x| wanted.contains(x)).collect())
}

fn valid<T: Copy>(all: &[T], name: fn(T) -> &'static str) -> String {
    all.iter().map(|x| name(*x)).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_everything() {
        let s = Selection::parse(None, None).unwrap();
        assert_eq!(s.workloads, Workload::ALL.to_vec());
        assert_eq!(s.variants, Variant::DEFAULT.to_vec());
    }

    #[test]
    fn picks_in_canonical_order_and_always_keeps_direct() {
        let s = Selection::parse(
            Some("connect,new-conns"),
            Some("haproxy,sockmesh-splice,haproxy"),
        )
        .unwrap();
        assert_eq!(s.workloads, vec![Workload::Cps, Workload::Connect]);
        assert_eq!(
            s.variants,
            vec![Variant::Direct, Variant::Haproxy, Variant::SockmeshSplice]
        );
        let s = Selection::parse(None, Some("direct")).unwrap();
        assert_eq!(s.variants, vec![Variant::Direct]);
    }

    #[test]
    fn every_name_round_trips() {
        for w in Workload::ALL {
            let s = Selection::parse(Some(w.flag()), None).unwrap();
            assert_eq!(s.workloads, vec![w]);
        }
        for v in Variant::ALL {
            let s = Selection::parse(None, Some(v.flag())).unwrap();
            assert!(s.variants.contains(&v));
        }
    }

    #[test]
    fn unknown_or_empty_names_list_the_valid_ones() {
        let e = Selection::parse(Some("new-conns,cps"), None).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("--workload: unknown name `cps`"), "{msg}");
        assert!(
            msg.contains("bulk1, bulk8, rr, new-conns, connect, inbound-conns"),
            "{msg}"
        );
        let e = Selection::parse(None, Some("sockmesh,")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("--variant: empty name"), "{msg}");
        assert!(
            msg.contains("direct, sockmesh, iptables, haproxy, sockmesh-splice"),
            "{msg}"
        );
    }
}
