//! Globs over fqns, matched by Unicode character (code point), not by byte.
//!
//! `*` any run of characters (dots included), `?` one character, `[abc]`, `[a-z]`, `[!a]` or `[^a]`
//! one character of (or not of) a set, `{a,b}` alternatives (nested ones too), `\x` the character
//! `x`. The whole fqn must match.
//!
//! A glob is translated into a regular expression (braces become alternations, never expanded)
//! and matched by `regex-lite`, whose matching time is linear in the fqn whatever the pattern.

use std::fmt;

use regex_lite::{Regex, RegexBuilder, escape};

/// Longest pattern accepted, in characters.
const MAX_PATTERN: usize = 4096;
/// Deepest nesting of braces.
const MAX_NESTING: u32 = 32;

/// A compiled glob.
#[derive(Debug, Clone)]
pub struct Glob {
    pattern: String,
    /// The characters before the first special one: every match starts with them, so most fqns
    /// are refused without running the regex.
    prefix: String,
    /// `None` for a pattern without special characters: it matches itself only.
    regex: Option<Regex>,
}

/// Why a pattern is not a glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobError(pub String);

impl fmt::Display for GlobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(msg: &str) -> Result<T, GlobError> {
    Err(GlobError(msg.to_owned()))
}

/// A character inside a regex class.
fn class_char(c: char) -> String {
    if matches!(c, '\\' | ']' | '[' | '^' | '-' | '&' | '~') {
        format!("\\{c}")
    } else {
        c.to_string()
    }
}

/// The regular expression of a glob, anchored at both ends.
fn translate(p: &[char]) -> Result<String, GlobError> {
    let mut re = String::from(r"(?s)\A");
    let mut depth = 0u32;
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            '\\' => {
                let Some(&c) = p.get(i + 1) else {
                    return err("a '\\' at the end escapes nothing");
                };
                re.push_str(&escape(&c.to_string()));
                i += 2;
                continue;
            }
            '*' => re.push_str(".*"),
            '?' => re.push('.'),
            '{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return err("braces nested deeper than 32");
                }
                re.push_str("(?:");
            }
            ',' if depth > 0 => re.push('|'),
            '}' => {
                if depth == 0 {
                    return err("a '}' without its '{' (escape it as \\})");
                }
                depth -= 1;
                re.push(')');
            }
            '[' => {
                let mut j = i + 1;
                let negated = matches!(p.get(j), Some('!' | '^'));
                if negated {
                    j += 1;
                }
                let mut class = String::from(if negated { "[^" } else { "[" });
                let mut first = true;
                loop {
                    let Some(&c) = p.get(j) else {
                        return err("a '[' without its ']'");
                    };
                    if c == ']' && !first {
                        break;
                    }
                    first = false;
                    let c = if c == '\\' {
                        j += 1;
                        match p.get(j) {
                            Some(&e) => e,
                            None => return err("a '[' without its ']'"),
                        }
                    } else {
                        c
                    };
                    if p.get(j + 1) == Some(&'-') && p.get(j + 2).is_some_and(|e| *e != ']') {
                        let end = p[j + 2];
                        if end < c {
                            return err("a range whose end comes before its start");
                        }
                        class.push_str(&format!("{}-{}", class_char(c), class_char(end)));
                        j += 3;
                    } else {
                        class.push_str(&class_char(c));
                        j += 1;
                    }
                }
                class.push(']');
                re.push_str(&class);
                i = j + 1;
                continue;
            }
            c => re.push_str(&escape(&c.to_string())),
        }
        i += 1;
    }
    if depth > 0 {
        return err("a '{' without its '}' (escape it as \\{)");
    }
    re.push_str(r"\z");
    Ok(re)
}

impl Glob {
    pub fn new(pattern: &str) -> Result<Glob, GlobError> {
        let chars: Vec<char> = pattern.chars().collect();
        if chars.len() > MAX_PATTERN {
            return err("longer than 4096 characters");
        }
        let re = translate(&chars)?;
        let regex = RegexBuilder::new(&re)
            .build()
            .map_err(|e| GlobError(format!("cannot compile it: {e}")))?;
        let literal = chars
            .iter()
            .take_while(|c| !matches!(c, '*' | '?' | '[' | '{' | '}' | '\\'))
            .count();
        Ok(Glob {
            pattern: pattern.to_owned(),
            prefix: chars[..literal].iter().collect(),
            regex: (literal < chars.len()).then_some(regex),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    pub fn is_match(&self, text: &str) -> bool {
        match &self.regex {
            None => text == self.prefix,
            Some(r) => text.starts_with(&self.prefix) && r.is_match(text),
        }
    }
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
            ("a,b", "a,b", true),
            ("a\\*b", "a*b", true),
            ("a\\*b", "axb", false),
            ("a\\{b\\}", "a{b}", true),
            ("[]]x", "]x", true),
            ("[a\\]]", "]", true),
            ("[-^]", "^", true),
            ("a.b", "axb", false),
            ("(x)|y+", "(x)|y+", true),
            ("caf?", "café", true),
            ("caf??", "cafe\u{301}", true),
            ("unicode.[ﬁx]", "unicode.ﬁ", true),
            ("сл??", "слон", true),
            ("***a", "bba", true),
            ("*", "line\nbreak", true),
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
        assert!(Glob::new(&format!("{}{}", "{".repeat(40), "}".repeat(40))).is_err());
        assert!(Glob::new(&"x".repeat(5000)).is_err());
    }

    #[test]
    fn many_alternatives_cost_no_expansion() {
        // 2^12 alternatives if expanded; one small regex here.
        let g = Glob::new(&format!("{}*????????????????????#", "{,}".repeat(12))).unwrap();
        let started = std::time::Instant::now();
        for _ in 0..1000 {
            assert!(!g.is_match("optim.state.layers.0.attn.wq.weight.exp_avg_sq"));
        }
        assert!(started.elapsed().as_secs() < 2);
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

        /// Any pattern either compiles or is refused; matching never panics, and the literal
        /// prefix never changes what the regex alone answers.
        #[test]
        fn arbitrary_patterns_never_panic(p in "[a*?.\\[\\]{},!^\\-\\\\]{0,24}", t in "[a.b]{0,24}") {
            if let Ok(g) = Glob::new(&p) {
                let chars: Vec<char> = p.chars().collect();
                let regex = Regex::new(&translate(&chars).unwrap()).unwrap();
                prop_assert_eq!(g.is_match(&t), regex.is_match(&t));
            }
        }
    }
}
