//! Pure parsing of pod specs, port ranges and CIDRs into the kernel's `PodConfig`.
use std::{net::IpAddr, path::PathBuf};

use sockmesh_common::{
    pod_flags, Cidr, PodConfig, PortRange, AF_INET, AF_INET6, MAX_EXCLUDED_CIDRS,
    MAX_EXCLUDED_PORTS,
};

/// A value from the outside as an error message shows it: control characters (a newline in a
/// pod annotation, say) escaped, so an error stays one line in logs and Events, and at most
/// [`SHOWN_MAX`] characters of it (annotation values may be 256 KiB).
pub fn shown(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == SHOWN_MAX {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// How many characters of an outside value an error message shows.
pub const SHOWN_MAX: usize = 64;

/// An inclusive port range, e.g. `22` or `8000-8100`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRangeSpec {
    pub lo: u16,
    pub hi: u16,
}

impl PortRangeSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        let port = |p: &str| -> Result<u16, String> {
            match p.trim().parse::<u16>() {
                Ok(0) | Err(_) => Err(format!("'{}' is not a port (1-65535)", shown(p))),
                Ok(n) => Ok(n),
            }
        };
        let (lo, hi) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(s)?, port(s)?),
        };
        if lo > hi {
            return Err(format!(
                "port range '{}' is backwards: write {hi}-{lo}",
                shown(s)
            ));
        }
        Ok(PortRangeSpec { lo, hi })
    }

    /// `22;8000-8100` (';' or ',' separated); empty means none.
    pub fn parse_list(s: &str) -> Result<Vec<Self>, String> {
        split_list(s).map(Self::parse).collect()
    }

    /// Whether every port of `other` is in this range.
    pub fn covers(&self, other: &PortRangeSpec) -> bool {
        self.lo <= other.lo && other.hi <= self.hi
    }
}

/// A CIDR such as `10.0.0.0/8` or `fd00::/8`; a bare address is a /32 or /128.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrSpec {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl CidrSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a.parse().map_err(|_| {
            format!(
                "'{}' is not a CIDR: use e.g. 10.0.0.0/8 or fd00::/8",
                shown(s)
            )
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("'{}': the prefix length must be 0-{max}", shown(s)))?
        };
        Ok(CidrSpec { addr, prefix })
    }

    pub fn parse_list(s: &str) -> Result<Vec<Self>, String> {
        split_list(s).map(Self::parse).collect()
    }

    /// Whether every address of `other` is in this CIDR (same family, a prefix at least as
    /// long, and the same leading bits).
    pub fn covers(&self, other: &CidrSpec) -> bool {
        let bits = |a: IpAddr| -> u128 {
            match a {
                IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
                IpAddr::V6(v6) => u128::from(v6),
            }
        };
        if self.addr.is_ipv4() != other.addr.is_ipv4() || other.prefix < self.prefix {
            return false;
        }
        let mask = u128::MAX
            .checked_shl(128 - u32::from(self.prefix))
            .unwrap_or(0);
        bits(self.addr) & mask == bits(other.addr) & mask
    }

    /// The kernel form: address and mask as network-order words, address pre-masked.
    pub fn to_kernel(self) -> Cidr {
        let (bytes, family): ([u8; 16], u16) = match self.addr {
            IpAddr::V4(a) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&a.octets());
                (b, AF_INET)
            }
            IpAddr::V6(a) => (a.octets(), AF_INET6),
        };
        let mut mask = [0u8; 16];
        for (i, m) in mask.iter_mut().enumerate() {
            let bits = (self.prefix as usize).saturating_sub(i * 8).min(8);
            *m = if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
        }
        let word = |b: &[u8; 16], i: usize| {
            u32::from_ne_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]])
        };
        let mut c = Cidr {
            family,
            ..Default::default()
        };
        for i in 0..4 {
            c.mask[i] = word(&mask, i);
            c.addr[i] = word(&bytes, i) & c.mask[i];
        }
        c
    }
}

fn split_list(s: &str) -> impl Iterator<Item = &str> {
    s.split([';', ',']).map(str::trim).filter(|p| !p.is_empty())
}

/// One `--pod` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    pub netns: PathBuf,
    pub exclude_outbound_ports: Vec<PortRangeSpec>,
    pub exclude_outbound_cidrs: Vec<CidrSpec>,
    pub exclude_inbound_ports: Vec<PortRangeSpec>,
}

impl PodSpec {
    /// `PATH[,exclude-ports=22;80-90][,exclude-cidrs=10.0.0.0/8][,exclude-inbound-ports=9000]`
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default().trim();
        if path.is_empty() {
            return Err("empty pod spec: give a netns path such as /var/run/netns/NAME".into());
        }
        let mut spec = PodSpec {
            netns: PathBuf::from(path),
            exclude_outbound_ports: vec![],
            exclude_outbound_cidrs: vec![],
            exclude_inbound_ports: vec![],
        };
        for opt in parts {
            let (k, v) = opt.split_once('=').ok_or_else(|| {
                format!(
                    "pod option '{}' needs a value, e.g. exclude-ports=22",
                    shown(opt)
                )
            })?;
            // Values are ';'-separated so that ',' can separate options.
            let items = || v.split(';').filter(|p| !p.trim().is_empty());
            match k.trim() {
                "exclude-ports" => {
                    for p in items() {
                        spec.exclude_outbound_ports.push(PortRangeSpec::parse(p)?);
                    }
                }
                "exclude-cidrs" => {
                    for p in items() {
                        spec.exclude_outbound_cidrs.push(CidrSpec::parse(p)?);
                    }
                }
                "exclude-inbound-ports" => {
                    for p in items() {
                        spec.exclude_inbound_ports.push(PortRangeSpec::parse(p)?);
                    }
                }
                other => {
                    return Err(format!(
                        "unknown pod option '{}': use exclude-ports, exclude-cidrs or exclude-inbound-ports",
                        shown(other)
                    ))
                }
            }
        }
        Ok(spec)
    }

    /// The kernel's view of this pod, with the global exclusions merged in.
    pub fn to_kernel(
        &self,
        global_ports: &[PortRangeSpec],
        global_cidrs: &[CidrSpec],
        global_inbound: &[PortRangeSpec],
    ) -> Result<PodConfig, String> {
        let mut cfg = PodConfig {
            flags: pod_flags::OUTBOUND | pod_flags::INBOUND | pod_flags::DNS,
            ..Default::default()
        };
        let name = self.netns.display();
        fill_ports(
            &mut cfg.exclude_outbound_ports,
            global_ports.iter().chain(&self.exclude_outbound_ports),
        )
        .map_err(|n| {
            format!("pod {name}: {n} excluded outbound port ranges, at most {MAX_EXCLUDED_PORTS}")
        })?;
        fill_ports(
            &mut cfg.exclude_inbound_ports,
            global_inbound.iter().chain(&self.exclude_inbound_ports),
        )
        .map_err(|n| {
            format!("pod {name}: {n} excluded inbound port ranges, at most {MAX_EXCLUDED_PORTS}")
        })?;
        let cidrs: Vec<_> = global_cidrs
            .iter()
            .chain(&self.exclude_outbound_cidrs)
            .collect();
        if cidrs.len() > MAX_EXCLUDED_CIDRS {
            return Err(format!(
                "pod {name}: {} excluded CIDRs, at most {MAX_EXCLUDED_CIDRS}",
                cidrs.len()
            ));
        }
        for (slot, c) in cfg.exclude_outbound_cidrs.iter_mut().zip(cidrs) {
            *slot = c.to_kernel();
        }
        Ok(cfg)
    }
}

fn fill_ports<'a>(
    slots: &mut [PortRange; MAX_EXCLUDED_PORTS],
    ranges: impl Iterator<Item = &'a PortRangeSpec>,
) -> Result<(), usize> {
    let ranges: Vec<_> = ranges.collect();
    if ranges.len() > MAX_EXCLUDED_PORTS {
        return Err(ranges.len());
    }
    for (slot, r) in slots.iter_mut().zip(ranges) {
        *slot = PortRange { lo: r.lo, hi: r.hi };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_cidrs_cover_what_lies_inside_them() {
        let r = PortRangeSpec::parse("8000-8100").expect("range");
        assert!(r.covers(&PortRangeSpec::parse("8000").expect("port")));
        assert!(r.covers(&PortRangeSpec::parse("8050-8100").expect("range")));
        assert!(!r.covers(&PortRangeSpec::parse("7999-8001").expect("range")));
        let c = |s: &str| CidrSpec::parse(s).expect("cidr");
        assert!(c("10.1.0.0/16").covers(&c("10.1.2.0/24")));
        assert!(c("10.1.0.0/16").covers(&c("10.1.2.3")));
        assert!(!c("10.1.0.0/16").covers(&c("10.0.0.0/8")), "wider");
        assert!(!c("10.1.0.0/16").covers(&c("10.2.0.0/24")));
        assert!(!c("10.1.0.0/16").covers(&c("0.0.0.0/0")));
        assert!(c("0.0.0.0/0").covers(&c("192.168.1.0/24")));
        assert!(!c("0.0.0.0/0").covers(&c("fd00::/8")), "families differ");
        assert!(c("fd00::/8").covers(&c("fd77::1")));
        assert!(!c("fd00::/8").covers(&c("fe80::/10")));
    }
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn pod_spec_with_every_option() {
        let s = PodSpec::parse(
            "/var/run/netns/a,exclude-ports=22;8000-8100,exclude-cidrs=10.1.0.0/16;fd00::/8,exclude-inbound-ports=9000",
        )
        .expect("valid");
        assert_eq!(s.netns, PathBuf::from("/var/run/netns/a"));
        assert_eq!(
            s.exclude_outbound_ports,
            vec![
                PortRangeSpec { lo: 22, hi: 22 },
                PortRangeSpec { lo: 8000, hi: 8100 }
            ]
        );
        assert_eq!(s.exclude_outbound_cidrs.len(), 2);
        assert_eq!(
            s.exclude_inbound_ports,
            vec![PortRangeSpec { lo: 9000, hi: 9000 }]
        );
    }

    #[test]
    fn pod_spec_errors_name_the_problem() {
        assert!(PodSpec::parse("").unwrap_err().contains("netns path"));
        assert!(PodSpec::parse("/x,exclude-ports")
            .unwrap_err()
            .contains("needs a value"));
        assert!(PodSpec::parse("/x,colour=red")
            .unwrap_err()
            .contains("unknown pod option 'colour'"));
        assert!(PodSpec::parse("/x,exclude-ports=0")
            .unwrap_err()
            .contains("not a port"));
        assert!(PodSpec::parse("/x,exclude-ports=90-80")
            .unwrap_err()
            .contains("backwards"));
        assert!(PodSpec::parse("/x,exclude-cidrs=10.0.0.0/33")
            .unwrap_err()
            .contains("0-32"));
        assert!(PodSpec::parse("/x,exclude-cidrs=banana")
            .unwrap_err()
            .contains("not a CIDR"));
    }

    #[test]
    fn cidr_to_kernel_masks_in_network_order() {
        let c = CidrSpec::parse("10.1.2.3/16").expect("valid").to_kernel();
        assert_eq!(c.family, AF_INET);
        assert_eq!(c.addr[0], u32::from_ne_bytes([10, 1, 0, 0]));
        assert_eq!(c.mask[0], u32::from_ne_bytes([255, 255, 0, 0]));
        let inside = [
            u32::from_ne_bytes(Ipv4Addr::new(10, 1, 200, 7).octets()),
            0,
            0,
            0,
        ];
        let outside = [
            u32::from_ne_bytes(Ipv4Addr::new(10, 2, 0, 1).octets()),
            0,
            0,
            0,
        ];
        assert!(c.contains(AF_INET, &inside));
        assert!(!c.contains(AF_INET, &outside));

        let c6 = CidrSpec::parse("fd00::/8").expect("valid").to_kernel();
        let o = Ipv6Addr::new(0xfd12, 0, 0, 0, 0, 0, 0, 1).octets();
        let w = |i: usize| u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]);
        assert!(c6.contains(AF_INET6, &[w(0), w(1), w(2), w(3)]));
        let all = CidrSpec::parse("0.0.0.0/0").expect("valid").to_kernel();
        assert!(all.contains(AF_INET, &outside));
        let host = CidrSpec::parse("10.1.2.3").expect("valid");
        assert_eq!(host.prefix, 32);
    }

    #[test]
    fn globals_merge_and_limits_hold() {
        let s = PodSpec::parse("/x,exclude-ports=22").expect("valid");
        let g = PortRangeSpec::parse_list("80;443").expect("valid");
        let k = s.to_kernel(&g, &[], &[]).expect("fits");
        assert_eq!(k.exclude_outbound_ports[0], PortRange { lo: 80, hi: 80 });
        assert_eq!(k.exclude_outbound_ports[2], PortRange { lo: 22, hi: 22 });
        assert_eq!(k.exclude_outbound_ports[3], PortRange::default());
        assert!(k.has(pod_flags::OUTBOUND) && k.has(pod_flags::INBOUND) && k.has(pod_flags::DNS));
        let many = PortRangeSpec::parse_list("1;2;3;4;5;6;7;8;9").expect("valid");
        assert!(s
            .to_kernel(&many, &[], &[])
            .unwrap_err()
            .contains("at most 8"));
    }
}
