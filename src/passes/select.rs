//! Choosing layers by name, written once for every pass that takes per-layer
//! settings.
//!
//! Patterns are shell-style globs on node and tensor names: `*` (any run, `/`
//! included), `?` (one character), `[abc]`, `[a-z]`, `[!a-z]` / `[^a-z]`, and `\`
//! to take the next character literally. The whole name must match.
//!
//! A layer is known by several names (its nodes', its weight's and, for a weight
//! a pass copied under a fresh name, the weight it was copied from: see
//! [`META_ORIGIN`]): a pattern matches the layer when it matches any of them.
//! Skip lists take the first matching pattern; per-layer rules ([`LayerRule`])
//! apply in order, so later rules win.

/// Metadata key on an initializer that a pass wrote as a copy of another under a
/// fresh name (BN folding of a weight other nodes also read, or a graph input):
/// the name of the tensor it was copied from, so that a rule naming the exported
/// weight (`features.3.conv.0.weight=8`) still finds the layer.
pub const META_ORIGIN: &str = "onnx_micronet.origin";

/// The name an initializer was copied from ([`META_ORIGIN`]), if it is a copy.
pub fn origin<'g>(g: &crate::graph::Graph<'g>, value: &str) -> Option<&'g str> {
    tensor_origin(g.initializer(value)?)
}

fn tensor_origin(t: &crate::onnx::proto::TensorProto) -> Option<&str> {
    t.metadata_props
        .iter()
        .find(|p| p.key() == META_ORIGIN)
        .map(|p| p.value())
}

/// Marks initializer `copy` of `g` as a copy of `original` (an initializer or a
/// graph input): its [`META_ORIGIN`] is `original`'s own origin when that is a
/// copy too, else `original`'s name. Nothing happens when `copy` is not an
/// initializer of `g`.
pub fn mark_copy(g: &mut crate::onnx::proto::GraphProto, copy: &str, original: &str) {
    let origin = g
        .initializer
        .iter()
        .find(|t| t.name() == original)
        .and_then(tensor_origin)
        .unwrap_or(original)
        .to_string();
    if let Some(t) = g.initializer.iter_mut().find(|t| t.name() == copy) {
        t.metadata_props.retain(|p| p.key() != META_ORIGIN);
        t.metadata_props
            .push(crate::onnx::proto::StringStringEntryProto {
                key: Some(META_ORIGIN.to_string()),
                value: Some(origin),
            });
    }
}

/// A per-layer rule of a recipe section (`[[prune.layer]]`, `[[quantize.layer]]`).
pub trait LayerRule {
    /// Its glob.
    fn pattern(&self) -> &str;
}

/// Whether `pattern` matches any of a layer's names.
pub fn matches_any<S: AsRef<str>>(pattern: &str, names: &[S]) -> bool {
    names.iter().any(|n| glob_match(pattern, n.as_ref()))
}

/// The first pattern of a skip list that matches any of the names.
pub fn first_match<'a, S: AsRef<str>>(patterns: &'a [String], names: &[S]) -> Option<&'a str> {
    patterns
        .iter()
        .find(|p| matches_any(p, names))
        .map(String::as_str)
}

/// The rules that match any of the names, in order: apply them in turn, so
/// later ones win.
pub fn matching<'a, R: LayerRule, S: AsRef<str>>(
    rules: &'a [R],
    names: &'a [S],
) -> impl Iterator<Item = &'a R> + 'a {
    rules
        .iter()
        .filter(move |r| matches_any(r.pattern(), names))
}

enum Tok {
    Star,
    Any,
    Lit(char),
    Class {
        ranges: Vec<(char, char)>,
        negated: bool,
    },
}

fn parse(pattern: &str) -> Vec<Tok> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' => {
                if !matches!(toks.last(), Some(Tok::Star)) {
                    toks.push(Tok::Star);
                }
            }
            '?' => toks.push(Tok::Any),
            '\\' if i + 1 < chars.len() => {
                i += 1;
                toks.push(Tok::Lit(chars[i]));
            }
            '[' => {
                // A class runs to the next ']' that is not its first member; unclosed: literal '['.
                let mut j = i + 1;
                let negated = j < chars.len() && matches!(chars[j], '!' | '^');
                if negated {
                    j += 1;
                }
                let start = j;
                let mut end = None;
                while j < chars.len() {
                    if chars[j] == ']' && j > start {
                        end = Some(j);
                        break;
                    }
                    j += 1;
                }
                match end {
                    None => toks.push(Tok::Lit('[')),
                    Some(end) => {
                        let body = &chars[start..end];
                        let mut ranges = Vec::new();
                        let mut k = 0;
                        while k < body.len() {
                            if k + 2 < body.len() && body[k + 1] == '-' {
                                ranges.push((body[k], body[k + 2]));
                                k += 3;
                            } else {
                                ranges.push((body[k], body[k]));
                                k += 1;
                            }
                        }
                        toks.push(Tok::Class { ranges, negated });
                        i = end;
                    }
                }
            }
            c => toks.push(Tok::Lit(c)),
        }
        i += 1;
    }
    toks
}

fn one(t: &Tok, c: char) -> bool {
    match t {
        Tok::Star => true,
        Tok::Any => true,
        Tok::Lit(l) => *l == c,
        Tok::Class { ranges, negated } => ranges.iter().any(|&(a, b)| a <= c && c <= b) != *negated,
    }
}

/// Whether `name` matches the glob `pattern` (whole name).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let toks = parse(pattern);
    let s: Vec<char> = name.chars().collect();
    // Greedy with one backtrack point (the last star): linear in practice.
    let (mut t, mut i) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        match toks.get(t) {
            Some(Tok::Star) => {
                star = Some((t, i));
                t += 1;
            }
            Some(tok) if one(tok, s[i]) => {
                t += 1;
                i += 1;
            }
            _ => match star {
                Some((st, si)) => {
                    t = st + 1;
                    i = si + 1;
                    star = Some((st, si + 1));
                }
                None => return false,
            },
        }
    }
    toks[t..].iter().all(|tok| matches!(tok, Tok::Star))
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("*", "/features/features.0/Conv"));
        assert!(glob_match("features.*.weight", "features.3.conv.weight"));
        assert!(glob_match("/features/*/Conv", "/features/features.0/Conv"));
        assert!(!glob_match("features.?.weight", "features.10.weight"));
        assert!(glob_match("features.??.weight", "features.10.weight"));
        assert!(glob_match("conv[0-2]", "conv1"));
        assert!(!glob_match("conv[!0-2]", "conv1"));
        assert!(glob_match("conv[!0-2]", "conv7"));
        assert!(glob_match("a\\*b", "a*b"));
        assert!(!glob_match("a\\*b", "axb"));
        assert!(!glob_match("classifier", "classifier.0.weight"));
        assert!(glob_match("*classifier*", "classifier.0.weight"));
        assert!(glob_match("a*b*c", "aXbYbZc"));
        assert!(!glob_match("a*b*c", "aXbYbZ"));
        assert!(glob_match("[a", "[a"));
        assert!(glob_match("", ""));
        assert!(!glob_match("", "x"));
    }
}
