//! Walking the node tree: typed getters that record a located error instead
//! of stopping, `${ENV}` interpolation, and unknown-key detection.

use std::sync::Arc;
use std::time::Duration;

use super::node::{ConfigError, Kind, Node, Pos};

/// Where the value of `${NAME}` comes from; the real environment in
/// production, a fixed map in tests.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Collects the errors of one file while the validator walks it.
pub struct Reader<'a> {
    pub file: Arc<str>,
    pub errors: Vec<ConfigError>,
    pub env: EnvLookup<'a>,
}

impl<'a> Reader<'a> {
    pub fn new(file: Arc<str>, env: EnvLookup<'a>) -> Self {
        Reader {
            file,
            errors: Vec::new(),
            env,
        }
    }

    /// Records a problem at `pos` for `field`.
    pub fn error(&mut self, pos: Pos, field: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            pos,
            field: field.to_string(),
            message: message.into(),
        });
    }

    /// Opens a mapping for field-by-field reading.
    pub fn map<'n>(&mut self, node: &'n Node, field: &str) -> Option<Fields<'n>> {
        match &node.kind {
            Kind::Map(entries) => Some(Fields {
                path: field.to_string(),
                entries: entries
                    .iter()
                    .map(|(k, p, v)| (k.as_str(), *p, v, false))
                    .collect(),
            }),
            other => {
                self.error(
                    node.pos,
                    field,
                    format!("expected a mapping, found {}", other.describe()),
                );
                None
            }
        }
    }

    /// A string, with `${NAME}` and `${NAME:-default}` taken from the
    /// environment. Numbers and booleans are accepted as their text only
    /// where `lenient` is set (environment values, header values).
    pub fn string(&mut self, node: &Node, field: &str) -> Option<String> {
        self.string_inner(node, field, false, false)
    }

    /// Like [`Reader::string`], also taking a number or boolean as its text.
    pub fn scalar_text(&mut self, node: &Node, field: &str) -> Option<String> {
        self.string_inner(node, field, true, false)
    }

    /// Like [`Reader::string`], but keeps `$$` for a later template parser.
    pub fn template_text(&mut self, node: &Node, field: &str) -> Option<String> {
        self.string_inner(node, field, false, true)
    }

    fn string_inner(
        &mut self,
        node: &Node,
        field: &str,
        lenient: bool,
        keep_escapes: bool,
    ) -> Option<String> {
        let raw = match &node.kind {
            Kind::Str(s) => s.clone(),
            Kind::Int(i) if lenient => i.to_string(),
            Kind::Float(f) if lenient => f.to_string(),
            Kind::Bool(b) if lenient => b.to_string(),
            other => {
                self.error(
                    node.pos,
                    field,
                    format!("expected a string, found {}", other.describe()),
                );
                return None;
            }
        };
        match interpolate(&raw, self.env, keep_escapes) {
            Ok(s) => Some(s),
            Err(msg) => {
                self.error(node.pos, field, msg);
                None
            }
        }
    }

    pub fn bool(&mut self, node: &Node, field: &str) -> Option<bool> {
        match &node.kind {
            Kind::Bool(b) => Some(*b),
            other => {
                self.error(
                    node.pos,
                    field,
                    format!("expected true or false, found {}", other.describe()),
                );
                None
            }
        }
    }

    /// A whole number within `min..=max`.
    pub fn int(&mut self, node: &Node, field: &str, min: i64, max: i64) -> Option<i64> {
        let value = match &node.kind {
            Kind::Int(i) => Some(*i),
            Kind::Str(s) => interpolate(s, self.env, false)
                .ok()
                .and_then(|s| s.trim().parse().ok()),
            _ => None,
        };
        match value {
            Some(v) if (min..=max).contains(&v) => Some(v),
            Some(v) => {
                self.error(
                    node.pos,
                    field,
                    format!("{v} is out of range; expected {min} to {max}"),
                );
                None
            }
            None => {
                self.error(
                    node.pos,
                    field,
                    format!("expected a whole number, found {}", node.kind.describe()),
                );
                None
            }
        }
    }

    /// A duration: a number of seconds (`30`, `0.5`) or a number with a unit
    /// (`500ms`, `30s`, `2m`, `1h`).
    pub fn duration(&mut self, node: &Node, field: &str) -> Option<Duration> {
        let parsed = match &node.kind {
            Kind::Int(i) if *i >= 0 => Some(Duration::from_secs(*i as u64)),
            Kind::Float(f) if *f >= 0.0 && f.is_finite() => Duration::try_from_secs_f64(*f).ok(),
            Kind::Str(s) => interpolate(s, self.env, false)
                .ok()
                .and_then(|s| parse_duration(&s)),
            _ => None,
        };
        if parsed.is_none() {
            self.error(
                node.pos,
                field,
                format!(
                    "expected a duration such as 30, \"30s\", \"500ms\" or \"2m\", found {}",
                    node.kind.describe()
                ),
            );
        }
        parsed
    }

    /// A [`duration`](Self::duration) that must be more than zero: a
    /// timeout of 0 would stop every command (or call) as it starts.
    pub fn timeout(&mut self, node: &Node, field: &str) -> Option<Duration> {
        let d = self.duration(node, field)?;
        if d.is_zero() {
            self.error(
                node.pos,
                field,
                "must be more than 0; there is no unlimited timeout: give a long one, such as \"1h\"".to_string(),
            );
            return None;
        }
        Some(d)
    }

    /// A byte size: a number of bytes or a number with a unit (`64KiB`,
    /// `10MiB`, `1GiB`, `10MB`).
    pub fn size(&mut self, node: &Node, field: &str) -> Option<u64> {
        let parsed = match &node.kind {
            Kind::Int(i) if *i >= 0 => Some(*i as u64),
            Kind::Str(s) => interpolate(s, self.env, false)
                .ok()
                .and_then(|s| parse_size(&s)),
            _ => None,
        };
        if parsed.is_none() {
            self.error(
                node.pos,
                field,
                format!(
                    "expected a size such as 1048576, \"64KiB\" or \"10MiB\", found {}",
                    node.kind.describe()
                ),
            );
        }
        parsed
    }

    /// A list of strings; a single string is taken as a list of one.
    pub fn string_list(&mut self, node: &Node, field: &str) -> Option<Vec<(String, Pos)>> {
        match &node.kind {
            Kind::Seq(items) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    if let Some(s) = self.string(item, &format!("{field}[{i}]")) {
                        out.push((s, item.pos));
                    }
                }
                Some(out)
            }
            Kind::Str(_) => self.string(node, field).map(|s| vec![(s, node.pos)]),
            other => {
                self.error(
                    node.pos,
                    field,
                    format!(
                        "expected a string or a list of strings, found {}",
                        other.describe()
                    ),
                );
                None
            }
        }
    }

    /// Name/value pairs, written either as a mapping (`HOME: /home/u`) or as
    /// a list of one-key mappings (`- HOME: /home/u`), the form of the
    /// original route list.
    pub fn pairs(&mut self, node: &Node, field: &str) -> Option<Vec<(String, String, Pos)>> {
        let mut out = Vec::new();
        let mut push_map = |reader: &mut Self, entries: &[(String, Pos, Node)], base: &str| {
            for (k, kpos, v) in entries {
                let f = format!("{base}.{k}");
                if let Some(val) = reader.scalar_text(v, &f) {
                    out.push((k.clone(), val, *kpos));
                }
            }
        };
        match &node.kind {
            Kind::Map(entries) => push_map(self, entries, field),
            Kind::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    let f = format!("{field}[{i}]");
                    match &item.kind {
                        Kind::Map(entries) => push_map(self, entries, &f),
                        other => self.error(
                            item.pos,
                            &f,
                            format!("expected `NAME: value`, found {}", other.describe()),
                        ),
                    }
                }
            }
            Kind::Null => {}
            other => {
                self.error(
                    node.pos,
                    field,
                    format!(
                        "expected a mapping of names to values, found {}",
                        other.describe()
                    ),
                );
                return None;
            }
        }
        Some(out)
    }
}

/// A mapping being read key by key; keys never asked for are reported as
/// unknown by [`Fields::finish`].
pub struct Fields<'n> {
    pub path: String,
    entries: Vec<(&'n str, Pos, &'n Node, bool)>,
}

impl<'n> Fields<'n> {
    /// The value under `key`, marking the key as known.
    pub fn get(&mut self, key: &str) -> Option<&'n Node> {
        let mut found = None;
        for e in self.entries.iter_mut() {
            if e.0 == key {
                e.3 = true;
                found = Some(e.2);
            }
        }
        found
    }

    /// The dotted path of `key` under this mapping.
    pub fn field(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Reports every key that no `get` asked for, suggesting the closest
    /// known key.
    pub fn finish(self, reader: &mut Reader<'_>, known: &[&str]) {
        for (key, pos, _, used) in &self.entries {
            if *used {
                continue;
            }
            let hint = known
                .iter()
                .map(|k| (edit_distance(key, k), *k))
                .filter(|(d, _)| *d <= 2)
                .min()
                .map(|(_, k)| format!("; did you mean `{k}`?"))
                .unwrap_or_else(|| format!("; known fields: {}", known.join(", ")));
            reader.error(
                *pos,
                &self.field(key),
                format!("unknown field `{key}`{hint}"),
            );
        }
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Replaces `${NAME}` and `${NAME:-default}` with environment values.
///
/// Only names made of letters, digits and `_` are environment references;
/// `${query.id}` and the like are request placeholders and stay for the
/// command template. `$$` is a literal `$` (kept as `$$` when
/// `keep_escapes`, so the template parser sees it too). With
/// `keep_escapes` (a command, split into words next) a value is quoted
/// for that split: it stays one literal part of its word, whatever it
/// holds (spaces, quotes, backslashes, `$`), as a request placeholder does.
///
/// A default applies when the variable is unset or empty, as in a shell;
/// without one, only an unset variable is an error.
pub fn interpolate(s: &str, env: EnvLookup<'_>, keep_escapes: bool) -> Result<String, String> {
    if !s.contains('$') {
        return Ok(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push_str(if keep_escapes { "$$" } else { "$" });
            rest = after;
            continue;
        }
        if let Some(body) = rest.strip_prefix("${")
            && let Some(end) = body.find('}')
        {
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            // body, body_file and request_id are request placeholders, not
            // environment variables.
            if is_env_name(name) && !matches!(name, "body" | "body_file" | "request_id") {
                let value = match ((env)(name), default) {
                    (Some(v), Some(d)) if v.is_empty() => Some(d.to_string()),
                    (Some(v), _) => Some(v),
                    (None, d) => d.map(str::to_string),
                };
                match value {
                    Some(v) if keep_escapes => out.push_str(&literal_for_template(&v)),
                    Some(v) => out.push_str(&v),
                    None => {
                        return Err(format!(
                            "environment variable {name} is not set; set it or give a default: ${{{name}:-value}}"
                        ));
                    }
                }
                rest = &body[end + 1..];
                continue;
            }
        }
        out.push('$');
        rest = &rest[1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `v` quoted for [`super::template::parse_command`]: single quotes (a
/// quote in it closed, escaped and reopened) keep the word splitting off
/// it, and `$$` keeps the placeholder parser off its `$`.
fn literal_for_template(v: &str) -> String {
    format!("'{}'", v.replace('$', "$$").replace('\'', r"'\''"))
}

fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `30`, `0.5`, `500ms`, `30s`, `2m`, `1h` -> a duration.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit.trim() {
        "" | "s" | "sec" => n,
        "ms" => n / 1000.0,
        "us" | "µs" => n / 1_000_000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok()
}

/// `1048576`, `64KiB`, `10MiB`, `1GiB`, `10MB`, `512k` -> bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1024,
        "m" | "mb" => 1000 * 1000,
        "mib" => 1024 * 1024,
        "g" | "gb" => 1000 * 1000 * 1000,
        "gib" => 1024 * 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "SECRET").then(|| "s3cret".to_string())
    }

    #[test]
    fn interpolates_env_and_keeps_placeholders() {
        let e: EnvLookup = &env;
        assert_eq!(interpolate("k=${SECRET}", e, false).unwrap(), "k=s3cret");
        assert_eq!(interpolate("${MISSING:-dflt}", e, false).unwrap(), "dflt");
        assert_eq!(
            interpolate("a ${query.id} b", e, false).unwrap(),
            "a ${query.id} b"
        );
        assert_eq!(interpolate("cost $$5", e, false).unwrap(), "cost $5");
        assert_eq!(interpolate("cost $$5", e, true).unwrap(), "cost $$5");
        assert_eq!(interpolate("$body", e, false).unwrap(), "$body");
        let err = interpolate("${MISSING}", e, false).unwrap_err();
        assert!(err.contains("MISSING is not set"), "{err}");
    }

    #[test]
    fn an_env_value_in_a_command_is_one_literal_part_of_its_word() {
        let odd = "a b'c\\d\"e$9${body}$$";
        let lookup = |name: &str| match name {
            "ODD" => Some(odd.to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        let e: EnvLookup = &lookup;
        let text = interpolate("php x.php --pass=${ODD} ${EMPTY} ${EMPTY:-d}", e, true).unwrap();
        let words = crate::config::template::parse_command(&text).unwrap();
        let lits: Vec<Option<&str>> = words.iter().map(|w| w.literal()).collect();
        let expected = format!("--pass={odd}");
        assert_eq!(
            lits,
            [
                Some("php"),
                Some("x.php"),
                Some(expected.as_str()),
                Some(""),
                Some("d")
            ]
        );
        // Outside a command the value is used as it is.
        assert_eq!(interpolate("${ODD}", e, false).unwrap(), odd);
        assert_eq!(interpolate("[${EMPTY}]", e, false).unwrap(), "[]");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_size("10MiB"), Some(10 * 1024 * 1024));
        assert_eq!(parse_size("64k"), Some(64_000));
        assert_eq!(parse_size("12 parsecs"), None);
    }
}
