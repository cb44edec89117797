use super::fast::{Verdict, VerdictKey};
use super::*;
use core::mem::size_of;

// The layouts are an ABI: these sizes are what bpftool and other readers see.
#[test]
fn layouts_have_no_implicit_padding() {
    assert_eq!(size_of::<SockAddr>(), 20);
    assert_eq!(size_of::<GlobalConfig>(), 56);
    assert_eq!(size_of::<quota::PodQuota>(), 32);
    assert_eq!(size_of::<Cidr>(), 40);
    assert_eq!(size_of::<PodConfig>(), 4 + 8 * 4 * 2 + 8 * 40);
    assert_eq!(size_of::<TupleKey>(), 8 + 20 + 20);
    assert_eq!(size_of::<DnsKey>(), 16);
    assert_eq!(size_of::<BindKey>(), 16);
    assert_eq!(size_of::<Event>(), 16);
    assert_eq!(size_of::<SocketEntry>(), 48);
    assert_eq!(size_of::<super::relay::RelayPeer>(), 16);
    assert_eq!(size_of::<VerdictKey>(), 32);
    assert_eq!(
        size_of::<Verdict>(),
        8 * 17 + 24 * super::fast::ADAPTIVE_BUCKETS + 4 * super::fast::LATENCY_RING
    );
    assert_eq!(size_of::<AgentSocket>(), 8);
    assert_eq!(size_of::<PodStats>(), 8 * counter::COUNT);
}

#[test]
fn cidr_matches_by_family_and_mask() {
    // 10.0.0.0/8 in network order as the kernel stores it on little endian.
    let c = Cidr {
        addr: [u32::from_be_bytes([10, 0, 0, 0]).to_be(), 0, 0, 0],
        mask: [u32::from_be_bytes([255, 0, 0, 0]).to_be(), 0, 0, 0],
        family: AF_INET,
        _pad: [0; 3],
    };
    let inside = [u32::from_be_bytes([10, 1, 2, 3]).to_be(), 0, 0, 0];
    let outside = [u32::from_be_bytes([11, 1, 2, 3]).to_be(), 0, 0, 0];
    assert!(c.contains(AF_INET, &inside));
    assert!(!c.contains(AF_INET, &outside));
    assert!(!c.contains(AF_INET6, &inside));
    assert!(!Cidr::default().contains(AF_INET, &inside));
}

#[cfg(feature = "user")]
#[test]
fn std_round_trip_in_network_order() {
    use std::net::SocketAddr;
    for s in [
        "10.1.2.3:8080",
        "[fd77::1]:53",
        "127.0.0.1:15001",
        "[::1]:1",
    ] {
        let a: SocketAddr = s.parse().expect("valid");
        let k = SockAddr::from_std(a);
        assert_eq!(k.to_std(), Some(a));
    }
    let k = SockAddr::from_std("10.1.2.3:8080".parse().expect("valid"));
    // Exactly the bytes the kernel's user_ip4/user_port hold.
    assert_eq!(k.addr[0].to_ne_bytes(), [10, 1, 2, 3]);
    assert_eq!(k.port.to_ne_bytes(), [0x1f, 0x90]);
    assert_eq!(SockAddr::default().to_std(), None);
}

#[test]
fn heartbeat_goes_stale_only_past_the_bound() {
    let cfg = GlobalConfig {
        heartbeat_ns: 10_000,
        fail_open_after_ns: 2_000,
        ..Default::default()
    };
    assert!(!cfg.is_stale(10_000));
    assert!(!cfg.is_stale(12_000), "exactly at the bound is still fresh");
    assert!(cfg.is_stale(12_001));
    assert!(
        !cfg.is_stale(5),
        "a heartbeat ahead of the reader's clock is fresh"
    );
    let never = GlobalConfig {
        fail_open_after_ns: 0,
        ..cfg
    };
    assert!(!never.is_stale(u64::MAX), "0 disables fail-open");
}

#[test]
fn port_range_is_inclusive() {
    let r = PortRange { lo: 80, hi: 90 };
    assert!(r.contains(80) && r.contains(90) && !r.contains(79) && !r.contains(91));
    assert!(!PortRange::default().contains(53));
}
