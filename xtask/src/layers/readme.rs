//! The layer table of README.md's `## Architecture` section: rows are the agent's layers from
//! top to bottom; column 1 names the layer, column 2 lists its modules in backticks
//! (`` `observe::recorder` ``, `` `sys`, `events` ``), column 3 says what lives there.

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub name: String,
    /// Module paths below `crate`, e.g. `["observe", "recorder"]`.
    pub modules: Vec<Vec<String>>,
}

pub const HEADING: &str = "## Architecture";

/// What to add when the section or its table is missing.
const HOW: &str = "a markdown table whose rows are the agent's layers from top to bottom: \
                   `| layer | modules | what lives there |`, e.g. `| app | \\`app\\` | wiring |`";

/// The layers, or the violations that keep the table from being read.
pub fn layers(readme: &str) -> Result<Vec<Layer>, Vec<String>> {
    let mut in_fence = false;
    let mut lines = readme.lines().enumerate().filter(|(_, l)| {
        if l.trim_start().starts_with("```") {
            in_fence = !in_fence;
            return false;
        }
        !in_fence
    });
    if !lines.any(|(_, l)| l.trim_end() == HEADING) {
        return Err(vec![format!(
            "README.md has no `{HEADING}` section: add one with {HOW}"
        )]);
    }
    let section: Vec<(usize, &str)> = lines
        .take_while(|(_, l)| !(l.starts_with("# ") || l.starts_with("## ")))
        .collect();
    let table: Vec<(usize, &str)> = section
        .iter()
        .copied()
        .skip_while(|(_, l)| !l.trim_start().starts_with('|'))
        .take_while(|(_, l)| l.trim_start().starts_with('|'))
        .collect();
    if table.len() < 3 {
        return Err(vec![format!(
            "README.md `{HEADING}` has no layer table (a header, a |---| line and one row per \
             layer): add {HOW}"
        )]);
    }
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (n, row) in table.iter().skip(2) {
        let cells = cells(row);
        let line = n + 1;
        let name = cells
            .first()
            .map_or("", |c| c.trim_matches(['*', '`', ' ']));
        if name.is_empty() {
            errors.push(format!(
                "README.md:{line}: an `{HEADING}` row has no layer name in its first column"
            ));
            continue;
        }
        let mut modules = Vec::new();
        for m in cells.get(1).map_or(Vec::new(), |c| code_spans(c)) {
            let m = m.strip_prefix("crate::").unwrap_or(m);
            let segs: Vec<String> = m.split("::").map(str::to_owned).collect();
            if segs.iter().all(|s| is_ident(s)) {
                modules.push(segs);
            } else {
                errors.push(format!(
                    "README.md:{line}: layer '{name}' lists `{m}`, which is not a module path \
                     (write it like `observe::recorder`, relative to crate::)"
                ));
            }
        }
        if modules.is_empty() {
            errors.push(format!(
                "README.md:{line}: layer '{name}' lists no module: put its modules in \
                 backticks in the second column"
            ));
        }
        out.push(Layer {
            name: name.to_owned(),
            modules,
        });
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// A table row's cells (`\|` does not split).
fn cells(row: &str) -> Vec<String> {
    let row = row.trim();
    let row = row.strip_prefix('|').unwrap_or(row);
    let row = row.strip_suffix('|').unwrap_or(row);
    let mut out = vec![String::new()];
    let mut chars = row.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                out.last_mut().expect("one cell").push('|');
                chars.next();
            }
            '|' => out.push(String::new()),
            c => out.last_mut().expect("one cell").push(c),
        }
    }
    out.iter().map(|c| c.trim().to_owned()).collect()
}

/// The contents of every `` `...` `` span, split on commas.
fn code_spans(cell: &str) -> Vec<&str> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .flat_map(|span| span.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// The row whose listed module is the longest prefix of `module`, and that prefix's length.
pub fn layer_of(layers: &[Layer], module: &[String]) -> Option<usize> {
    layers
        .iter()
        .enumerate()
        .flat_map(|(i, l)| l.modules.iter().map(move |m| (i, m)))
        .filter(|(_, m)| module.starts_with(m))
        .max_by_key(|(_, m)| m.len())
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    const README: &str = "# x\n\n## Architecture\n\nLayers, top to bottom:\n\n\
        | layer | modules | what lives there |\n|---|---|---|\n\
        | **app** | `app`, `cli` | wiring |\n\
        | observe | `observe`, `crate::observe::recorder` | metrics \\| logs |\n\
        | base | `sys`, `events` and `observe::recorder::ring` | leaves |\n\n\
        | not | `this` | table |\n## Next\n| other | `table` | x |\n";

    fn p(s: &str) -> Vec<String> {
        s.split("::").map(str::to_owned).collect()
    }

    #[test]
    fn table_rows_become_layers() {
        let got = layers(README).unwrap();
        let names: Vec<_> = got.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["app", "observe", "base"]);
        assert_eq!(got[0].modules, vec![p("app"), p("cli")]);
        assert_eq!(got[1].modules, vec![p("observe"), p("observe::recorder")]);
        assert_eq!(
            got[2].modules,
            vec![p("sys"), p("events"), p("observe::recorder::ring")]
        );
    }

    #[test]
    fn longest_prefix_wins() {
        let l = layers(README).unwrap();
        assert_eq!(layer_of(&l, &p("observe::sink")), Some(1));
        assert_eq!(layer_of(&l, &p("observe::recorder")), Some(1));
        assert_eq!(layer_of(&l, &p("observe::recorder::ring::buf")), Some(2));
        assert_eq!(layer_of(&l, &p("app::takeover")), Some(0));
        assert_eq!(layer_of(&l, &p("apps")), None);
        assert_eq!(layer_of(&l, &[]), None);
    }

    #[test]
    fn missing_or_broken_tables_are_violations() {
        let none = layers("# x\n## Other\n| a | `b` | c |\n").unwrap_err();
        assert!(none[0].contains("no `## Architecture` section"), "{none:?}");
        let fenced = layers("```\n## Architecture\n```\n").unwrap_err();
        assert!(fenced[0].contains("no `## Architecture` section"));
        let empty = layers("## Architecture\n\ntext only\n## Next\n| a | `b` | c |\n");
        assert!(empty.unwrap_err()[0].contains("no layer table"));
        let bad = layers(
            "## Architecture\n| l | m | w |\n|-|-|-|\n| a | none | x |\n\
                          | b | `c::` | y |\n",
        )
        .unwrap_err();
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert!(bad[0].contains("README.md:4: layer 'a' lists no module"));
        assert!(bad[1].contains("lists `c::`, which is not a module path"));
    }
}
