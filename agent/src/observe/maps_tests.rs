use super::*;
use crate::datapath::rawmap::RawEntry;
use sockmesh_common::peer::{breaker_state, direction, throttle_reason, PeerKey, PeerState};

fn bytes<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: T is one of the schema's #[repr(C)] types, which have no padding bytes.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
        .to_vec()
}

#[test]
fn a_peer_state_entry_decodes_to_named_fields() {
    let key = PeerKey {
        netns_cookie: 4097,
        peer: SockAddr::from_std("10.1.2.3:8080".parse().expect("literal")),
        direction: direction::OUTBOUND,
        _pad: 0,
    };
    let mut st = PeerState {
        conns_total: 5,
        bytes_out: 1234,
        breaker: breaker_state::OPEN,
        ..Default::default()
    };
    st.throttled[throttle_reason::RATE] = 3;
    let layout = maps::find("SM_PEER_STATE").expect("known map");
    let v = decode_entry(
        layout,
        &RawEntry {
            key: bytes(&key),
            values: vec![bytes(&st)],
        },
    );
    assert_eq!(v["key"]["netns_cookie"], 4097);
    assert_eq!(v["key"]["peer"], "10.1.2.3:8080");
    assert_eq!(v["key"]["direction"], "outbound");
    assert!(v["key"].get("_pad").is_none(), "padding is not shown");
    assert_eq!(v["value"]["conns_total"], 5);
    assert_eq!(v["value"]["bytes_out"], 1234);
    assert_eq!(v["value"]["throttled"]["rate"], 3);
    assert_eq!(v["value"]["breaker"], "open");
    assert_eq!(v["value"]["last_error"], "none");
}

#[test]
fn a_per_cpu_entry_keeps_one_value_per_cpu() {
    let layout = maps::find("SM_POD_STATS").expect("known map");
    let mut a = sockmesh_common::PodStats::default();
    a.counters[sockmesh_common::counter::REDIRECT_TCP] = 2;
    let b = sockmesh_common::PodStats::default();
    let v = decode_entry(
        layout,
        &RawEntry {
            key: 9u64.to_ne_bytes().to_vec(),
            values: vec![bytes(&a), bytes(&b)],
        },
    );
    assert_eq!(v["values"][0]["cpu"], 0);
    assert_eq!(v["values"][0]["value"]["counters"]["redirect_tcp"], 2);
    assert_eq!(v["values"][1]["value"]["counters"]["redirect_tcp"], 0);
}

#[test]
fn exclusions_read_as_ranges_and_cidrs() {
    let layout = maps::find("SM_PODS").expect("known map");
    let mut pc = sockmesh_common::PodConfig::default();
    pc.exclude_outbound_ports[0] = PortRange { lo: 22, hi: 22 };
    pc.exclude_outbound_ports[1] = PortRange { lo: 8000, hi: 8100 };
    pc.exclude_outbound_cidrs[0] = Cidr {
        addr: [u32::from_ne_bytes([10, 1, 0, 0]), 0, 0, 0],
        mask: [u32::from_ne_bytes([255, 255, 0, 0]), 0, 0, 0],
        family: sockmesh_common::AF_INET,
        _pad: [0; 3],
    };
    let v = decode(layout.value, &bytes(&pc));
    assert_eq!(v["exclude_outbound_ports"], json!(["22", "8000-8100"]));
    assert_eq!(v["exclude_inbound_ports"], json!([]));
    assert_eq!(v["exclude_outbound_cidrs"], json!(["10.1.0.0/16"]));
}

#[test]
fn an_unknown_map_is_refused_naming_the_known_ones() {
    let err = dump(Path::new("/nonexistent"), "SM_NOPE", false)
        .expect_err("unknown map")
        .to_string();
    assert!(err.contains("unknown map 'SM_NOPE'"), "{err}");
    assert!(
        err.contains("SM_PEER_STATE") && err.contains("SM_POD_STATS"),
        "{err}"
    );
}
