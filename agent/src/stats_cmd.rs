//! `sockmesh stats`: the kernel's per-pod counters, read straight from the pinned maps.
use anyhow::Result;
use sockmesh_common::counter;

use crate::{cli::StatsArgs, datapath::stats::read_pod_counters};

pub fn run(args: &StatsArgs) -> Result<()> {
    let pods = read_pod_counters(&args.bpffs_dir)?;
    if args.json {
        let rows: Vec<_> = pods
            .iter()
            .map(|p| {
                let mut c = serde_json::Map::new();
                for (i, name) in counter::NAMES.iter().enumerate() {
                    c.insert((*name).into(), p.get(i).into());
                }
                serde_json::json!({ "netns_cookie": p.netns_cookie, "enrolled": p.enrolled, "counters": c })
            })
            .collect();
        println!("{}", serde_json::json!({ "pods": rows }));
        return Ok(());
    }
    print!("{}", table(&pods));
    Ok(())
}

fn table(pods: &[crate::datapath::stats::PodCounters]) -> String {
    let mut out = format!("{:<20} {:<8}", "NETNS_COOKIE", "ENROLLED");
    for name in counter::NAMES {
        out += &format!(" {:>15}", name.to_uppercase());
    }
    out.push('\n');
    for p in pods {
        out += &format!(
            "{:<20} {:<8}",
            p.netns_cookie,
            if p.enrolled { "yes" } else { "no" }
        );
        for i in 0..counter::NAMES.len() {
            out += &format!(" {:>15}", p.get(i));
        }
        out.push('\n');
    }
    if pods.is_empty() {
        out += "(no pods have been enrolled)\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::stats::PodCounters;

    #[test]
    fn table_has_a_row_per_pod_with_every_counter() {
        let mut counters = [0u64; counter::COUNT];
        counters[counter::REDIRECT_TCP] = 7;
        counters[counter::REDIRECT_DNS] = 3;
        let t = table(&[PodCounters {
            netns_cookie: 4242,
            enrolled: true,
            counters,
        }]);
        let lines: Vec<_> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].contains("REDIRECT_TCP") && lines[0].contains("EVENT_LOST"));
        let cells: Vec<_> = lines[1].split_whitespace().collect();
        assert_eq!(cells[0], "4242");
        assert_eq!(cells[1], "yes");
        assert_eq!(cells[2 + counter::REDIRECT_TCP], "7");
        assert_eq!(cells[2 + counter::REDIRECT_DNS], "3");
        assert!(table(&[]).contains("no pods"));
    }
}
