//! Just enough of a Rust lexer for the `layers` check: tokens with line numbers, comments
//! dropped, string/char literals and lifetimes reduced to opaque tokens (so a path inside a
//! string or a comment is never taken for an import), then the three things the check needs
//! from a file: `mod` declarations (with `#[path]`), `use` trees (flattened, renames kept)
//! and `crate::`/`self::`/`super::`/relative paths in code.

/// One token. Numbers, chars and lifetimes are `Other`: nothing looks inside them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tok {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
    /// A string literal's contents (escapes left as written); needed for `#[path = "..."]`.
    Str(String),
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub tok: Tok,
    pub line: u32,
}

/// `mod name;` (a module in another file), maybe under `#[path = "..."]`, maybe inside
/// inline `mod a { ... }` blocks (`inline`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModDecl {
    pub name: String,
    pub path_attr: Option<String>,
    pub inline: Vec<String>,
}

/// A path that may point into the crate: a leaf of a `use` tree or a path in code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRef {
    /// As written: `["super", "super", "x", "Y"]`, `["crate", "a"]`, `["relay", "Counts"]`.
    pub segs: Vec<String>,
    /// Written with a leading `::` (an external crate).
    pub global: bool,
    /// The inline `mod a { ... }` blocks it sits in, outermost first.
    pub inline: Vec<String>,
    pub line: u32,
    /// From a `use` declaration (`pub use` included).
    pub is_use: bool,
    /// For a `use` leaf: the name it brings into scope (`as` rename or last segment); none for
    /// globs and `as _`.
    pub alias: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub mods: Vec<ModDecl>,
    pub refs: Vec<PathRef>,
}

fn ident_start(c: char) -> bool {
    c == '_' || c.is_alphabetic()
}

fn ident_continue(c: char) -> bool {
    c == '_' || c.is_alphanumeric()
}

/// Tokenizes `src`; never fails (unterminated literals and comments run to the end).
pub fn lex(src: &str) -> Vec<Token> {
    let c: Vec<char> = src.chars().collect();
    let at = |k: usize| c.get(k).copied().unwrap_or('\0');
    let mut out = Vec::new();
    let mut line = 1u32;
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        let start_line = line;
        let tok = match ch {
            '\n' => {
                line += 1;
                i += 1;
                continue;
            }
            _ if ch.is_whitespace() => {
                i += 1;
                continue;
            }
            '/' if at(i + 1) == '/' => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            '/' if at(i + 1) == '*' => {
                // Block comments nest in Rust.
                let mut depth = 0;
                while i < c.len() {
                    if c[i] == '/' && at(i + 1) == '*' {
                        depth += 1;
                        i += 2;
                    } else if c[i] == '*' && at(i + 1) == '/' {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        line += u32::from(c[i] == '\n');
                        i += 1;
                    }
                }
                continue;
            }
            '"' => {
                let (s, next) = quoted(&c, i + 1, &mut line);
                i = next;
                Tok::Str(s)
            }
            '\'' => {
                i = char_or_lifetime(&c, i);
                Tok::Other
            }
            ':' if at(i + 1) == ':' => {
                i += 2;
                Tok::PathSep
            }
            _ if ch.is_ascii_digit() => {
                while ident_continue(at(i)) || (at(i) == '.' && at(i + 1).is_ascii_digit()) {
                    i += 1;
                }
                Tok::Other
            }
            _ if ident_start(ch) => {
                let start = i;
                while ident_continue(at(i)) {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let hashes = (i..).take_while(|&k| at(k) == '#').count();
                match (word.as_str(), at(i)) {
                    ("r" | "br" | "cr", '"' | '#') if at(i + hashes) == '"' => {
                        let (s, next) = raw(&c, i + hashes + 1, hashes, &mut line);
                        i = next;
                        Tok::Str(s)
                    }
                    ("b" | "c", '"') => {
                        let (s, next) = quoted(&c, i + 1, &mut line);
                        i = next;
                        Tok::Str(s)
                    }
                    ("b", '\'') => {
                        i = char_or_lifetime(&c, i);
                        Tok::Other
                    }
                    // A raw identifier: `r#type` is the identifier `type`.
                    ("r", '#') if ident_start(at(i + 1)) => {
                        let start = i + 1;
                        i += 1;
                        while ident_continue(at(i)) {
                            i += 1;
                        }
                        Tok::Ident(c[start..i].iter().collect())
                    }
                    _ => Tok::Ident(word),
                }
            }
            _ => {
                i += 1;
                Tok::Punct(ch)
            }
        };
        out.push(Token {
            tok,
            line: start_line,
        });
    }
    out
}

/// A `"..."` literal's body from `i` (just past the quote); returns it and the index past the
/// closing quote.
fn quoted(c: &[char], mut i: usize, line: &mut u32) -> (String, usize) {
    let start = i;
    while i < c.len() && c[i] != '"' {
        if c[i] == '\\' {
            i += 1;
        }
        if c.get(i) == Some(&'\n') {
            *line += 1;
        }
        i += 1;
    }
    let end = i.min(c.len());
    (c[start..end].iter().collect(), end + 1)
}

/// A raw string's body from `i` (past `r#..#"`), ended by `"` and `hashes` hashes.
fn raw(c: &[char], mut i: usize, hashes: usize, line: &mut u32) -> (String, usize) {
    let start = i;
    while i < c.len() {
        if c[i] == '"' && (1..=hashes).all(|k| c.get(i + k) == Some(&'#')) {
            return (c[start..i].iter().collect(), i + 1 + hashes);
        }
        *line += u32::from(c[i] == '\n');
        i += 1;
    }
    (c[start..].iter().collect(), c.len())
}

/// Skips a char literal (`'x'`, `'\n'`, `'\u{1F600}'`) or a lifetime/label (`'a`) starting
/// at the quote `c[i]`; returns the index past it.
fn char_or_lifetime(c: &[char], i: usize) -> usize {
    let at = |k: usize| c.get(k).copied().unwrap_or('\0');
    if at(i + 1) == '\\' {
        let mut j = i + 3;
        while j < c.len() && c[j] != '\'' && c[j] != '\n' {
            j += 1;
        }
        return j + 1;
    }
    if at(i + 2) == '\'' {
        return i + 3;
    }
    let mut j = i + 1;
    while ident_continue(at(j)) {
        j += 1;
    }
    j
}

/// The `mod` declarations and crate-relative paths of one file.
pub fn parse(src: &str) -> Parsed {
    let toks = lex(src);
    let t = |k: usize| toks.get(k).map(|t| &t.tok);
    let ident = |k: usize| match t(k) {
        Some(Tok::Ident(s)) => Some(s.as_str()),
        _ => None,
    };
    let mut out = Parsed::default();
    let mut depth = 0usize;
    // Inline modules open around the cursor: (name, brace depth inside them).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut path_attr: Option<String> = None;
    let mut i = 0;
    while i < toks.len() {
        let names = || inline.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        match &toks[i].tok {
            Tok::Punct('#') => {
                let open = if t(i + 1) == Some(&Tok::Punct('!')) {
                    i + 2
                } else {
                    i + 1
                };
                if t(open) != Some(&Tok::Punct('[')) {
                    i += 1;
                    continue;
                }
                if let (Some("path"), Some(Tok::Punct('=')), Some(Tok::Str(p))) =
                    (ident(open + 1), t(open + 2), t(open + 3))
                {
                    path_attr = Some(p.clone());
                }
                // Skip the whole attribute: `#[cfg(...)]` and friends hold no imports.
                let mut level = 0;
                i = open;
                while i < toks.len() {
                    match toks[i].tok {
                        Tok::Punct('[') => level += 1,
                        Tok::Punct(']') => level -= 1,
                        _ => {}
                    }
                    i += 1;
                    if level == 0 {
                        break;
                    }
                }
                continue;
            }
            Tok::Ident(w) if w == "mod" => {
                if let Some(name) = ident(i + 1) {
                    match t(i + 2) {
                        Some(Tok::Punct(';')) => {
                            out.mods.push(ModDecl {
                                name: name.to_owned(),
                                path_attr: path_attr.take(),
                                inline: names(),
                            });
                            i += 3;
                            continue;
                        }
                        Some(Tok::Punct('{')) => {
                            depth += 1;
                            inline.push((name.to_owned(), depth));
                            path_attr = None;
                            i += 3;
                            continue;
                        }
                        _ => {}
                    }
                }
            }
            Tok::Ident(w) if w == "use" => {
                i = parse_use(&toks, i + 1, &names(), &mut out.refs);
                continue;
            }
            Tok::Ident(first) if t(i + 1) == Some(&Tok::PathSep) => {
                let before = |k: usize| i.checked_sub(k).and_then(t);
                // Not a path's start: `a::b` continued, a method turbofish `.f::<T>`,
                // `$crate::` in a macro, `pub(in crate::x)` (visibility, not a use).
                let skip = matches!(before(1), Some(Tok::PathSep | Tok::Punct('.' | '$')))
                    || (before(1) == Some(&Tok::Ident("in".into()))
                        && before(2) == Some(&Tok::Punct('(')));
                let mut segs = vec![first.clone()];
                let mut j = i + 1;
                while t(j) == Some(&Tok::PathSep) {
                    let Some(s) = ident(j + 1) else { break };
                    segs.push(s.to_owned());
                    j += 2;
                }
                if !skip && segs.len() > 1 {
                    out.refs.push(PathRef {
                        segs,
                        global: false,
                        inline: names(),
                        line: toks[i].line,
                        is_use: false,
                        alias: None,
                    });
                }
                i = j;
                continue;
            }
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Tok::Punct(';') => path_attr = None,
            _ => {}
        }
        i += 1;
    }
    out
}

/// Parses a `use` tree starting at `i` (just past `use`) up to its `;`, pushing one
/// [`PathRef`] per leaf; returns the index past the `;`.
fn parse_use(toks: &[Token], mut i: usize, inline: &[String], out: &mut Vec<PathRef>) -> usize {
    let global = toks.get(i).map(|t| &t.tok) == Some(&Tok::PathSep);
    if global {
        i += 1;
    }
    let mut leaves = Vec::new();
    use_tree(toks, &mut i, Vec::new(), &mut leaves);
    for (segs, alias, line) in leaves {
        out.push(PathRef {
            segs,
            global,
            inline: inline.to_vec(),
            line,
            is_use: true,
            alias,
        });
    }
    // Past the `;` (or to the end of a malformed tree).
    while let Some(t) = toks.get(i) {
        i += 1;
        if t.tok == Tok::Punct(';') {
            break;
        }
    }
    i
}

type Leaf = (Vec<String>, Option<String>, u32);

/// One use tree: `a::b`, `a::b as c`, `a::*`, `a::{tree, tree}`, with `prefix` before it.
fn use_tree(toks: &[Token], i: &mut usize, mut segs: Vec<String>, out: &mut Vec<Leaf>) {
    let t = |k: usize| toks.get(k).map(|t| &t.tok);
    loop {
        let line = toks.get(*i).map_or(0, |t| t.line);
        match t(*i) {
            Some(Tok::Ident(w)) => {
                segs.push(w.clone());
                *i += 1;
                if t(*i) == Some(&Tok::PathSep) {
                    *i += 1;
                    continue;
                }
                // `a::{self}` names `a` itself.
                if segs.last().is_some_and(|s| s == "self") && segs.len() > 1 {
                    segs.pop();
                }
                let mut alias = segs.last().cloned();
                if let (Some(Tok::Ident(kw)), Some(Tok::Ident(name))) = (t(*i), t(*i + 1)) {
                    if kw == "as" {
                        alias = (name != "_").then(|| name.clone());
                        *i += 2;
                    }
                }
                out.push((segs, alias, line));
                return;
            }
            Some(Tok::Punct('*')) => {
                *i += 1;
                out.push((segs, None, line));
                return;
            }
            Some(Tok::Punct('{')) => {
                *i += 1;
                loop {
                    match t(*i) {
                        None | Some(Tok::Punct(';')) => return,
                        Some(Tok::Punct('}')) => {
                            *i += 1;
                            return;
                        }
                        Some(Tok::Punct(',')) => *i += 1,
                        _ => {
                            let before = *i;
                            use_tree(toks, i, segs.clone(), out);
                            if *i == before {
                                *i += 1;
                            }
                        }
                    }
                }
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uses(src: &str) -> Vec<(String, Option<String>)> {
        parse(src)
            .refs
            .into_iter()
            .filter(|r| r.is_use)
            .map(|r| (r.segs.join("::"), r.alias))
            .collect()
    }

    fn code_paths(src: &str) -> Vec<String> {
        parse(src)
            .refs
            .into_iter()
            .filter(|r| !r.is_use)
            .map(|r| r.segs.join("::"))
            .collect()
    }

    fn s(x: &str) -> Option<String> {
        Some(x.to_owned())
    }

    #[test]
    fn use_trees_are_flattened() {
        let got = uses(
            "pub use crate::a::{b, c::{d as e, *}, self, f::{self as g}};\n\
             use super::super::x::Y;\nuse std::io::{self, Read as _};\nuse ::ext::Z;",
        );
        assert_eq!(
            got,
            vec![
                ("crate::a::b".into(), s("b")),
                ("crate::a::c::d".into(), s("e")),
                ("crate::a::c".into(), None),
                ("crate::a".into(), s("a")),
                ("crate::a::f".into(), s("g")),
                ("super::super::x::Y".into(), s("Y")),
                ("std::io".into(), s("io")),
                ("std::io::Read".into(), None),
                ("ext::Z".into(), s("Z")),
            ]
        );
        let global = parse("use ::ext::Z;").refs;
        assert!(global[0].global);
    }

    #[test]
    fn comments_and_strings_hold_no_paths() {
        let src = r####"
            // use crate::commented;
            /* crate::block /* nested crate::inner */ still::comment */
            /// doc: crate::doc
            fn f() {
                let a = "crate::in_string \" crate::escaped";
                let b = r#"crate::raw "quoted" "#;
                let c = b"crate::bytes";
                let d = '"'; let e = '\''; let f: &'static str = "x";
                crate::real::call(d);
            }
        "####;
        assert_eq!(code_paths(src), vec!["crate::real::call"]);
        assert!(uses(src).is_empty());
    }

    #[test]
    fn code_paths_and_what_is_not_one() {
        let src = "pub(crate) fn f(x: super::T) -> self::U {\n\
                   pub(in crate::vis) struct S;\n\
                   let v = Vec::<u8>::new(); x.into::<crate::Ty>();\n\
                   macro_rules! m { () => { $crate::mac::f() } }\n\
                   for i in crate::iter::all() {}\n\
                   relay::Counts::new() }";
        assert_eq!(
            code_paths(src),
            vec![
                "super::T",
                "self::U",
                "crate::Ty",
                "crate::iter::all",
                "relay::Counts::new"
            ]
        );
    }

    #[test]
    fn mod_declarations_path_attrs_and_inline_modules() {
        let src = "pub mod a;\n#[cfg(test)]\n#[path = \"a_tests.rs\"]\nmod tests;\n\
                   mod inner {\n    mod deep;\n    use super::x::Y;\n}\nuse crate::z;\n";
        let p = parse(src);
        let mods: Vec<_> = p
            .mods
            .iter()
            .map(|m| (m.name.as_str(), m.path_attr.as_deref(), m.inline.clone()))
            .collect();
        assert_eq!(
            mods,
            vec![
                ("a", None, vec![]),
                ("tests", Some("a_tests.rs"), vec![]),
                ("deep", None, vec!["inner".to_owned()]),
            ]
        );
        let refs: Vec<_> = p.refs.iter().map(|r| (r.inline.clone(), r.line)).collect();
        assert_eq!(refs, vec![(vec!["inner".to_owned()], 7), (vec![], 9)]);
    }

    #[test]
    fn lifetimes_and_chars_do_not_eat_code() {
        let src = "fn f<'a>(x: &'a str) -> char { let c = 'x'; let u = '\\u{1F600}'; \
                   'outer: loop { break 'outer; } crate::after::it(); c }";
        assert_eq!(code_paths(src), vec!["crate::after::it"]);
        let lines = lex("a\n\"two\nlines\"\nb");
        assert_eq!(lines.last().unwrap().line, 4);
    }
}
