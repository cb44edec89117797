//! Plain-text tables: columns as wide as their widest cell, left-aligned, two spaces apart.

pub struct Cols {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Cols {
    pub fn new(headers: &[&str]) -> Cols {
        Cols {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
}

/// The table, or `empty` (plus a newline) after the header when there are no rows.
pub fn render(t: Cols, empty: &str) -> String {
    let mut widths: Vec<usize> = t.headers.iter().map(|h| h.chars().count()).collect();
    for r in &t.rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| -> String {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s += c;
            } else {
                s += &format!("{c:<w$}  ");
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(&t.headers);
    for r in &t.rows {
        out += &line(r);
    }
    if t.rows.is_empty() && !empty.is_empty() {
        out += empty;
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let mut t = Cols::new(&["A", "LONG_HEADER", "C"]);
        t.row(vec!["wide cell".into(), "1".into(), "x".into()]);
        let s = render(t, "none");
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "A          LONG_HEADER  C");
        assert_eq!(lines[1], "wide cell  1            x");
        assert_eq!(render(Cols::new(&["A"]), "none"), "A\nnone\n");
    }
}
