//! Command templates: `cmd` split into words once, at load, each word a list
//! of literal text and request placeholders.
//!
//! A word renders to exactly one argv element whatever the request holds:
//! nothing is ever re-split or handed to a shell, so a body such as
//! `; rm -rf / #` arrives as one harmless argument.

use std::fmt;

/// A request value that fills part of a word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placeholder {
    /// `$body` / `${body}`: the request or message body.
    Body,
    /// `${body_file}`: path of the file holding the body (`payload-to: file`).
    BodyFile,
    /// `${request_id}`.
    RequestId,
    /// `${query.NAME}`: first value of a query parameter.
    Query(String),
    /// `${header.NAME}`: a request header (case-insensitive), or an AMQP
    /// message header.
    Header(String),
    /// `${path.NAME}`: a `{NAME}` segment of the route url.
    Path(String),
    /// `${var.NAME}`: a variable set by a pre plugin.
    Var(String),
}

/// One piece of a word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Lit(String),
    /// A placeholder, with the default used when the value is absent
    /// (`${query.page:-1}`); without one, an absent value is a 400.
    Hole(Placeholder, Option<String>),
}

/// One argv element to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word(pub Vec<Part>);

impl Word {
    /// The word's text when it holds no placeholder.
    pub fn literal(&self) -> Option<&str> {
        match self.0.as_slice() {
            [] => Some(""),
            [Part::Lit(s)] => Some(s),
            _ => None,
        }
    }

    pub fn placeholders(&self) -> impl Iterator<Item = &Placeholder> {
        self.0.iter().filter_map(|p| match p {
            Part::Hole(ph, _) => Some(ph),
            Part::Lit(_) => None,
        })
    }
}

impl fmt::Display for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placeholder::Body => f.write_str("${body}"),
            Placeholder::BodyFile => f.write_str("${body_file}"),
            Placeholder::RequestId => f.write_str("${request_id}"),
            Placeholder::Query(n) => write!(f, "${{query.{n}}}"),
            Placeholder::Header(n) => write!(f, "${{header.{n}}}"),
            Placeholder::Path(n) => write!(f, "${{path.{n}}}"),
            Placeholder::Var(n) => write!(f, "${{var.{n}}}"),
        }
    }
}

impl fmt::Display for Word {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.0 {
            match part {
                Part::Lit(s) => f.write_str(&s.replace('$', "$$"))?,
                Part::Hole(ph, None) => write!(f, "{ph}")?,
                Part::Hole(ph, Some(d)) => {
                    let s = ph.to_string();
                    write!(f, "{}:-{d}}}", &s[..s.len() - 1])?
                }
            }
        }
        Ok(())
    }
}

/// Splits a command line into words (shell-words rules: quotes and
/// backslashes group, nothing is expanded) and parses placeholders.
pub fn parse_command(cmd: &str) -> Result<Vec<Word>, String> {
    let words = shell_words::split(cmd).map_err(|e| format!("cannot split command: {e}"))?;
    if words.is_empty() {
        return Err("the command is empty".into());
    }
    words.iter().map(|w| parse_word(w)).collect()
}

/// Parses the placeholders of one word.
pub fn parse_word(word: &str) -> Result<Word, String> {
    let mut parts = Vec::new();
    let mut lit = String::new();
    let mut rest = word;
    while let Some(i) = rest.find('$') {
        lit.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(after) = rest.strip_prefix("$$") {
            lit.push('$');
            rest = after;
            continue;
        }
        let (ph, default, consumed) = if let Some(after) = rest.strip_prefix("$body") {
            if after.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
                return Err(bare_dollar(rest));
            }
            (Placeholder::Body, None, "$body".len())
        } else if let Some(body) = rest.strip_prefix("${") {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unclosed placeholder in {word:?}: missing `}}`"))?;
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d.to_string())),
                None => (inner, None),
            };
            (parse_placeholder(name)?, default, end + 3)
        } else {
            return Err(bare_dollar(rest));
        };
        if !lit.is_empty() {
            parts.push(Part::Lit(std::mem::take(&mut lit)));
        }
        parts.push(Part::Hole(ph, default));
        rest = &rest[consumed..];
    }
    lit.push_str(rest);
    if !lit.is_empty() || parts.is_empty() {
        parts.push(Part::Lit(lit));
    }
    Ok(Word(parts))
}

fn bare_dollar(at: &str) -> String {
    let shown: String = at.chars().take(20).collect();
    format!(
        "`{shown}` is not a placeholder: use $body, ${{query.NAME}}, ${{header.NAME}}, \
         ${{path.NAME}}, ${{var.NAME}}, ${{request_id}} or ${{body_file}}; ${{NAME}} for an \
         environment value at load time; $$ for a literal $"
    )
}

fn parse_placeholder(name: &str) -> Result<Placeholder, String> {
    let valid_key = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    let ph = match name.split_once('.') {
        None => match name {
            "body" => Placeholder::Body,
            "body_file" => Placeholder::BodyFile,
            "request_id" => Placeholder::RequestId,
            _ => {
                return Err(format!(
                    "unknown placeholder `${{{name}}}`: an environment variable that is not set \
                     at load time, or a misspelt placeholder (body, body_file, request_id, \
                     query.NAME, header.NAME, path.NAME, var.NAME)"
                ));
            }
        },
        Some((kind, key)) if valid_key(key) => match kind {
            "query" => Placeholder::Query(key.to_string()),
            "header" => Placeholder::Header(key.to_ascii_lowercase()),
            "path" => Placeholder::Path(key.to_string()),
            "var" => Placeholder::Var(key.to_string()),
            _ => {
                return Err(format!(
                    "unknown placeholder kind `{kind}` in `${{{name}}}`; expected query, header, path or var"
                ));
            }
        },
        Some(_) => return Err(format!("bad placeholder name in `${{{name}}}`")),
    };
    Ok(ph)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_and_parses() {
        let words =
            parse_command("php add.php $body --id=${query.id:-0} '${header.X-Token}'").unwrap();
        assert_eq!(words.len(), 5);
        assert_eq!(words[0].literal(), Some("php"));
        assert_eq!(words[2].0, vec![Part::Hole(Placeholder::Body, None)]);
        assert_eq!(
            words[3].0,
            vec![
                Part::Lit("--id=".into()),
                Part::Hole(Placeholder::Query("id".into()), Some("0".into()))
            ]
        );
        assert_eq!(
            words[4].0,
            vec![Part::Hole(Placeholder::Header("x-token".into()), None)]
        );
    }

    #[test]
    fn rejects_bad_placeholders() {
        assert!(
            parse_word("$HOME")
                .unwrap_err()
                .contains("not a placeholder")
        );
        assert!(
            parse_word("${bodyy}")
                .unwrap_err()
                .contains("unknown placeholder")
        );
        assert!(
            parse_word("${cookie.x}")
                .unwrap_err()
                .contains("kind `cookie`")
        );
        assert!(parse_word("${query.x").unwrap_err().contains("unclosed"));
        assert!(
            parse_word("$bodyfoo")
                .unwrap_err()
                .contains("not a placeholder")
        );
        assert_eq!(parse_word("a$$b").unwrap().literal(), Some("a$b"));
    }

    #[test]
    fn displays_round_trip() {
        for s in ["php", "--id=${query.id:-0}", "${body}", "cost$$"] {
            let w = parse_word(s).unwrap();
            assert_eq!(parse_word(&w.to_string()).unwrap(), w, "{s}");
        }
    }
}
