//! Parsing a plugin's configuration.

use serde::de::DeserializeOwned;

/// Deserializes a plugin's configuration from the JSON text the host hands
/// over (`context.config`, or the argument of `config.validate`).
///
/// The error names the field that failed (`keys[1].id: invalid type: ...`)
/// because the user wrote YAML, not this JSON: a line and column in the JSON
/// text would point nowhere they can see, so those are left out.
///
/// A `null` config (the route's plugin entry has none) is read as `{}`, so a
/// plugin whose fields all have defaults needs no entry at all; when `{}`
/// will not do either, the error says the configuration is missing and what
/// it lacks (`configuration is missing: missing field `keys``).
pub fn parse_config<T: DeserializeOwned>(config: &str) -> Result<T, String> {
    if config.trim() == "null" {
        return parse::<T>(config).or_else(|_| {
            parse::<T>("{}").map_err(|err| format!("configuration is missing: {err}"))
        });
    }
    parse(config)
}

fn parse<T: DeserializeOwned>(config: &str) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_str(config);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let message = without_position(err.inner());
        if path == "." {
            message
        } else {
            format!("{path}: {message}")
        }
    })?;
    de.end().map_err(|err| without_position(&err))?;
    Ok(value)
}

/// The message of a serde_json error without its trailing
/// ` at line L column C`.
fn without_position(err: &serde_json::Error) -> String {
    let message = err.to_string();
    let suffix = format!(" at line {} column {}", err.line(), err.column());
    match message.strip_suffix(&suffix) {
        Some(stripped) => stripped.to_owned(),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::parse_config;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    #[allow(dead_code)]
    struct Settings {
        keys: Vec<Key>,
        #[serde(default)]
        tolerance_seconds: u64,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Key {
        id: String,
    }

    #[test]
    fn names_the_nested_field_that_failed() {
        let err = parse_config::<Settings>(r#"{"keys":[{"id":"a"},{"id":3}]}"#).unwrap_err();
        assert_eq!(
            err,
            r#"keys[1].id: invalid type: integer `3`, expected a string"#
        );
    }

    #[test]
    fn names_an_unknown_field() {
        let err = parse_config::<Settings>(r#"{"keys":[],"tolerance":5}"#).unwrap_err();
        assert!(err.contains("unknown field `tolerance`"), "{err}");
        assert!(
            err.contains("tolerance-seconds"),
            "lists the known fields: {err}"
        );
    }

    #[test]
    fn says_when_the_config_is_missing() {
        let err = parse_config::<Settings>("null").unwrap_err();
        assert_eq!(err, "configuration is missing: missing field `keys`");
    }

    #[test]
    fn null_is_an_empty_map_when_every_field_has_a_default() {
        #[derive(Debug, Deserialize, PartialEq)]
        #[serde(deny_unknown_fields)]
        struct Defaults {
            #[serde(default)]
            level: u8,
        }
        assert_eq!(parse_config::<Defaults>("null"), Ok(Defaults { level: 0 }));
        assert_eq!(
            parse_config::<Option<u8>>("null"),
            Ok(None),
            "null itself wins when accepted"
        );
    }

    #[test]
    fn rejects_trailing_text() {
        assert!(parse_config::<Settings>(r#"{"keys":[]} x"#).is_err());
        assert!(parse_config::<Settings>(r#"{"keys":[]}"#).is_ok());
    }
}
