//! The scale step in the report: a table per variant (Markdown) and, in the chart, the kernel
//! memory per connection as a ratio to direct's (what the mesh adds to what an idle
//! connection costs the kernel anyway).

use super::chart::{Cell, Group, Row};
use super::plan::Variant;
use super::scale::ScaleResult;

pub fn markdown(scale: &[&ScaleResult]) -> String {
    let Some(first) = scale.first() else {
        return String::new();
    };
    let mut s = format!(
        "\n## Scale: {} concurrent idle connections\n\n\
         Held by {} processes per step (half clients in the client pod, half servers in the server pod, \
         each under an open-file limit of {}), half IPv4 and half IPv6 over several server \
         ports. **Kernel** is what the slab caches (every socket, its inode, file and dentry, \
         the BPF maps' elements and socket storage) and TCP's buffer pages grew by, machine-wide, \
         divided by the connections: both ends of each connection, and for the proxy tier the \
         agent's two sockets too (anything else running meanwhile is counted as well, except \
         `proc_inode_cache`: inodes of `/proc/PID/fd` made when a process lists another's \
         descriptors, shown below but not a cost of holding a connection). **Map** \
         is what the mesh's own map says it grew by (fdinfo memlock): `SM_FAST_SOCKS` for the \
         fast path, `SM_ORIG_TUPLE` for the proxy tier. **Agent RSS** is after holding them for \
         a while; **agent CPU** is its CPU time while they were held, per second (its idle \
         sweep over them).\n\n\
         | variant | connections | established in | kernel per connection | map per connection | agent RSS per connection | agent fds before -> with -> after | agent CPU while held | went direct |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        first.conns,
        first.processes,
        super::holders::holder_nofile(),
    );
    for r in scale {
        let na = || "n/a".to_string();
        s.push_str(&format!(
            "| {} | {} | {:.1} s ({:.0}/s) | {:.0} B | {} | {} | {} | {} | {} |\n",
            r.variant.name(),
            r.conns,
            r.establish_secs,
            r.conns as f64 / r.establish_secs,
            r.kernel_per_conn_bytes(),
            r.map_per_conn_bytes()
                .map_or_else(na, |b| format!("{b:.0} B ({})", r.map.unwrap_or("?"))),
            r.rss_per_conn_bytes()
                .map_or_else(na, |b| format!("**{b:.0} B**")),
            r.agent.as_ref().map_or_else(na, |a| format!(
                "{} -> {} -> {}",
                a.fds_before, a.fds_after, a.fds_after_close
            )),
            r.agent
                .as_ref()
                .map_or_else(na, |a| format!("{:.1} ms/s", a.cpu_ms_per_s_held)),
            r.direct.map_or_else(na, |d| d.to_string()),
        ));
    }
    s.push_str("\nSlab caches that grew most:\n\n");
    for r in scale {
        s.push_str(&format!(
            "- {}: {}\n",
            r.variant.name(),
            r.kernel
                .top_caches
                .iter()
                .map(|(n, b)| format!("{n} {:.0} B", *b as f64 / r.conns as f64))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    s
}

/// The chart's scale group: kernel memory per idle connection, each variant's over direct's.
/// None without a direct step to divide by.
pub fn chart_group(scale: &[&ScaleResult], series: &[Variant]) -> Option<Group> {
    let direct = scale.iter().find(|s| s.variant == Variant::Direct)?;
    let base = direct.kernel_per_conn_bytes();
    if base <= 0.0 {
        return None;
    }
    Some(Group {
        title: format!(
            "scale: idle connections held ({} direct; the proxy tier as many as its fds allow)",
            direct.conns
        ),
        rows: vec![Row {
            label: "kernel memory per connection (B, lower better)".into(),
            target: None,
            cells: series
                .iter()
                .map(|v| match scale.iter().find(|s| s.variant == *v) {
                    Some(s) => Cell::Ratio(s.kernel_per_conn_bytes() / base),
                    None => Cell::NotApplicable,
                })
                .collect(),
        }],
    })
}
