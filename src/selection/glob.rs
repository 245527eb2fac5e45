//! Globs over fqns, matched by Unicode character (code point), not by byte.
//!
//! `*` any run of characters (dots included), `?` one character, `[abc]`, `[a-z]`, `[!a]` or `[^a]`
//! one character of (or not of) a set, `{a,b}` alternatives (nested ones too), `\x` the character
//! `x`. The whole fqn must match.

use std::fmt;

/// Most alternatives one pattern may expand to.
const MAX_ALTERNATIVES: usize = 4096;
/// Most brace groups in one pattern.
const MAX_GROUPS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Char(char),
    Any,
    Star,
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

/// A compiled glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    pattern: String,
    /// One token sequence per alternative of the braces.
    alternatives: Vec<Vec<Token>>,
}

/// Why a pattern is not a glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobError(pub &'static str);

impl fmt::Display for GlobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl Glob {
    pub fn new(pattern: &str) -> Result<Glob, GlobError> {
        let chars: Vec<char> = pattern.chars().collect();
        // Expansion recurses once per brace group: bound their number (and so the stack).
        if chars.iter().filter(|c| **c == '{').count() > MAX_GROUPS {
            return Err(GlobError("more than 64 '{' groups"));
        }
        let mut alternatives = Vec::new();
        for alt in expand(&chars)? {
            alternatives.push(tokens(&alt)?);
        }
        Ok(Glob {
            pattern: pattern.to_owned(),
            alternatives,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    pub fn is_match(&self, text: &str) -> bool {
        let text: Vec<char> = text.chars().collect();
        self.alternatives.iter().any(|t| matches(t, &text))
    }
}

/// Expands `{a,b}` (outside classes and escapes) into alternatives, innermost first.
fn expand(p: &[char]) -> Result<Vec<Vec<char>>, GlobError> {
    // Find the first top-level `{`, its matching `}`, and the top-level commas between them.
    let mut i = 0;
    let mut in_class = false;
    let mut open = None;
    let mut depth = 0;
    let mut commas = Vec::new();
    while i < p.len() {
        match p[i] {
            '\\' => i += 1,
            '[' if !in_class => {
                in_class = true;
                // A leading `!`/`^` and a `]` right after it belong to the class.
                if matches!(p.get(i + 1), Some('!' | '^')) {
                    i += 1;
                }
                if p.get(i + 1) == Some(&']') {
                    i += 1;
                }
            }
            ']' if in_class => in_class = false,
            '{' if !in_class => {
                if depth == 0 {
                    open = Some(i);
                }
                depth += 1;
            }
            ',' if !in_class && depth == 1 => commas.push(i),
            '}' if !in_class => {
                if depth == 0 {
                    return Err(GlobError("a '}' without its '{' (escape it as \\})"));
                }
                depth -= 1;
                if depth == 0 {
                    let start = open.expect("set with depth");
                    let mut out = Vec::new();
                    let mut bounds = vec![start];
                    bounds.extend(&commas);
                    bounds.push(i);
                    for w in bounds.windows(2) {
                        let mut alt = p[..start].to_vec();
                        alt.extend_from_slice(&p[w[0] + 1..w[1]]);
                        alt.extend_from_slice(&p[i + 1..]);
                        for e in expand(&alt)? {
                            out.push(e);
                            if out.len() > MAX_ALTERNATIVES {
                                return Err(GlobError("more than 4096 alternatives"));
                            }
                        }
                    }
                    return Ok(out);
                }
            }
            _ => {}
        }
        i += 1;
    }
    if depth > 0 {
        return Err(GlobError("a '{' without its '}' (escape it as \\{)"));
    }
    if in_class {
        return Err(GlobError("a '[' without its ']'"));
    }
    Ok(vec![p.to_vec()])
}

fn tokens(p: &[char]) -> Result<Vec<Token>, GlobError> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            '\\' => {
                let c = *p
                    .get(i + 1)
                    .ok_or(GlobError("a '\\' at the end escapes nothing"))?;
                out.push(Token::Char(c));
                i += 2;
            }
            '?' => {
                out.push(Token::Any);
                i += 1;
            }
            '*' => {
                if out.last() != Some(&Token::Star) {
                    out.push(Token::Star);
                }
                i += 1;
            }
            '[' => {
                let mut j = i + 1;
                let negated = matches!(p.get(j), Some('!' | '^'));
                if negated {
                    j += 1;
                }
                let mut ranges = Vec::new();
                let mut first = true;
                loop {
                    let Some(&c) = p.get(j) else {
                        return Err(GlobError("a '[' without its ']'"));
                    };
                    if c == ']' && !first {
                        break;
                    }
                    first = false;
                    let c = if c == '\\' {
                        j += 1;
                        *p.get(j).ok_or(GlobError("a '[' without its ']'"))?
                    } else {
                        c
                    };
                    if p.get(j + 1) == Some(&'-') && p.get(j + 2).is_some_and(|e| *e != ']') {
                        let end = p[j + 2];
                        if end < c {
                            return Err(GlobError("a range whose end comes before its start"));
                        }
                        ranges.push((c, end));
                        j += 3;
                    } else {
                        ranges.push((c, c));
                        j += 1;
                    }
                }
                out.push(Token::Class { negated, ranges });
                i = j + 1;
            }
            c => {
                out.push(Token::Char(c));
                i += 1;
            }
        }
    }
    Ok(out)
}

fn one(t: &Token, c: char) -> bool {
    match t {
        Token::Char(x) => *x == c,
        Token::Any => true,
        Token::Class { negated, ranges } => {
            ranges.iter().any(|(a, b)| *a <= c && c <= *b) != *negated
        }
        Token::Star => unreachable!("stars are handled by the matcher"),
    }
}

/// Wildcard matching with one backtracking point (the last star): linear in practice,
/// O(pattern x text) at worst.
fn matches(p: &[Token], t: &[char]) -> bool {
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(Token::Star) => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(tok) if one(tok, t[ti]) => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|t| *t == Token::Star)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn matching_table() {
        let table: &[(&str, &str, bool)] = &[
            ("model.*", "model.layers.0.w", true),
            ("model.*", "optim.model.x", false),
            ("*.wq", "model.layers.0.attn.wq", true),
            ("*wq*", "a.wq.b", true),
            ("wq", "a.wq", false),
            ("layers.?.w", "layers.7.w", true),
            ("layers.?.w", "layers.10.w", false),
            ("layers.[0-5].*", "layers.3.x", true),
            ("layers.[0-5].*", "layers.6.x", false),
            ("layers.[!0-5].*", "layers.6.x", true),
            ("layers.[^0-5].*", "layers.2.x", false),
            ("m.{a,b}.w", "m.b.w", true),
            ("m.{a,b{c,d}}.w", "m.bd.w", true),
            ("m.{a,b{c,d}}.w", "m.b.w", false),
            ("m.{,x}w", "m.w", true),
            ("a\\*b", "a*b", true),
            ("a\\*b", "axb", false),
            ("a\\{b\\}", "a{b}", true),
            ("[]]x", "]x", true),
            ("caf?", "café", true),
            ("caf??", "cafe\u{301}", true),
            ("unicode.[ﬁx]", "unicode.ﬁ", true),
            ("сл??", "слон", true),
            ("***a", "bba", true),
            ("", "", true),
            ("*", "", true),
            ("?", "", false),
        ];
        for (p, t, want) in table {
            assert_eq!(Glob::new(p).unwrap().is_match(t), *want, "{p:?} vs {t:?}");
        }
    }

    #[test]
    fn errors() {
        for bad in ["a[b", "a{b", "a}b", "a\\", "[z-a]", "a{b,{c}"] {
            assert!(Glob::new(bad).is_err(), "{bad}");
        }
        let many = "{a,b}".repeat(13);
        assert!(Glob::new(&many).is_err(), "2^13 alternatives");
        assert!(
            Glob::new(&"{a}".repeat(100_000)).is_err(),
            "groups that would recurse deeply"
        );
        assert!(Glob::new(&format!("{}{}", "{".repeat(100_000), "}".repeat(100_000))).is_err());
        assert!(Glob::new(&"{a}".repeat(64)).is_ok());
    }

    proptest! {
        /// A literal pattern (every character escaped) matches exactly itself.
        #[test]
        fn escaped_text_matches_only_itself(s in "\\PC{0,12}", other in "\\PC{0,12}") {
            let pattern: String = s.chars().flat_map(|c| ['\\', c]).collect();
            let g = Glob::new(&pattern).unwrap();
            prop_assert!(g.is_match(&s));
            prop_assert_eq!(g.is_match(&other), s == other);
        }

        /// Stars and question marks never make matching fail to terminate or panic.
        #[test]
        fn wildcards_never_panic(p in "[a*?.\\[\\]{},!-]{0,16}", t in "[a.b]{0,24}") {
            if let Ok(g) = Glob::new(&p) {
                let _ = g.is_match(&t);
            }
        }
    }
}
