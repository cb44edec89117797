use super::maps::{find, MAPS};
use super::{Field, Kind};
use crate::{map_names, peer};

/// Each description covers its type exactly: fields in order, no overlap, no gap, ending
/// at the type's size. A field added to a layout without its description fails here.
fn covers(map: &str, what: &str, size: usize, fields: &[Field]) {
    let mut at = 0;
    for fl in fields {
        assert_eq!(
            fl.offset, at,
            "{map} {what}: field {} starts at {}, expected {at}",
            fl.name, fl.offset
        );
        at += fl.kind.size();
    }
    assert_eq!(at, size, "{map} {what}: fields cover {at} of {size} bytes");
}

#[test]
fn every_layout_covers_its_type_byte_for_byte() {
    for m in MAPS {
        covers(m.name, "key", m.key_size, m.key);
        covers(m.name, "value", m.value_size, m.value);
    }
}

#[test]
fn every_pinned_map_has_a_layout_and_no_other() {
    let names = map_names::ALL.iter().chain(peer::map_names::ALL.iter());
    let mut count = 0;
    for n in names {
        assert!(find(n).is_some(), "{n} has no layout");
        count += 1;
    }
    assert_eq!(MAPS.len(), count);
}

#[test]
fn counter_names_fit_their_slots() {
    for m in MAPS {
        for fl in m.key.iter().chain(m.value) {
            if let Kind::Counters { names, slots } = fl.kind {
                assert!(names.len() <= slots, "{} {}", m.name, fl.name);
            }
        }
    }
}
