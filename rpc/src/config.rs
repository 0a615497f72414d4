//! `spdk_tgt --json <file>`: replay a saved config in SPDK's two passes
//! (rpc-contract.md §1.6; SPDK `lib/init/json_config.c`).
//!
//! SPDK replays the file through a temporary RPC socket; clone-tgt calls the
//! registry in-process instead, which gives the same method, state and error
//! semantics without a socket.

use std::future::Future;

use serde_json::{Map, Value};

use crate::error::RpcError;
use crate::json::{strip_dup_markers, StrictValue, DUP_KEY};
use crate::registry::{
    dispatch, method_mask, set_state, state, subsystem_exists, RUNTIME, STARTUP,
};

/// Why a config load failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("Parsing JSON configuration failed: {0}")]
    Parse(String),
    #[error("Invalid JSON configuration: {0}")]
    Invalid(String),
    #[error("Method '{0}' was not found")]
    MethodNotFound(String),
    #[error("method '{method}' failed: {error}")]
    Rpc { method: String, error: RpcError },
    #[error("subsystem initialization failed: {0}")]
    Init(String),
}

/// Remove `//` and `/* */` comments outside strings, as SPDK's parser does
/// with `SPDK_JSON_PARSE_FLAG_ALLOW_COMMENTS`. A block comment becomes one
/// space so it cannot join two tokens.
pub fn strip_comments(text: &str) -> Result<String, ConfigError> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let mut in_str = false;
    while i < b.len() {
        let c = b[i];
        if in_str {
            out.push(c);
            if c == b'\\' && i + 1 < b.len() {
                out.push(b[i + 1]);
                i += 2;
                continue;
            }
            if c == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        match (c, b.get(i + 1)) {
            (b'"', _) => {
                in_str = true;
                out.push(c);
                i += 1;
            }
            (b'/', Some(b'/')) => {
                // Up to, not including, the newline.
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            (b'/', Some(b'*')) => {
                let rest = &b[i + 2..];
                let Some(end) = rest.windows(2).position(|w| w == b"*/") else {
                    return Err(ConfigError::Parse("unterminated /* comment".into()));
                };
                out.push(b' ');
                i += 2 + end + 2;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    // Only ASCII delimiters were removed together with whole runs of bytes
    // between them, so this stays valid UTF-8.
    String::from_utf8(out).map_err(|e| ConfigError::Parse(e.to_string()))
}

#[derive(Debug)]
struct Entry {
    method: String,
    params: Option<Value>,
    dup: bool,
}

#[derive(Debug)]
enum Item {
    One(Entry),
    /// A nested array in `config`: sent as a JSON-RPC batch by SPDK 26.x.
    Batch(Vec<Entry>),
}

#[derive(Debug)]
struct SubsystemConfig {
    name: String,
    items: Vec<Item>,
}

fn only_keys(obj: &Map<String, Value>, allowed: &[&str]) -> bool {
    obj.keys()
        .all(|k| k != DUP_KEY && allowed.contains(&k.as_str()))
}

/// An object of no keys but `keys` whose first names a string: that string
/// and the rest of the object (the shape of config entries and subsystems).
fn named_object(v: Value, keys: [&str; 2]) -> Option<(String, Map<String, Value>)> {
    let Value::Object(mut obj) = v else {
        return None;
    };
    if !only_keys(&obj, &keys) {
        return None;
    }
    let Some(Value::String(name)) = obj.remove(keys[0]) else {
        return None;
    };
    Some((name, obj))
}

/// `{"method": <string>, "params": <object, optional>}`, strictly.
fn decode_entry(v: Value) -> Result<Entry, ConfigError> {
    let bad = || ConfigError::Invalid("Failed to decode config entry".into());
    let (method, mut obj) = named_object(v, ["method", "params"]).ok_or_else(bad)?;
    let (params, dup) = match obj.remove("params") {
        None => (None, false),
        Some(mut p @ Value::Object(_)) => {
            let dup = strip_dup_markers(&mut p);
            (Some(p), dup)
        }
        Some(_) => return Err(bad()),
    };
    Ok(Entry {
        method,
        params,
        dup,
    })
}

/// `{"subsystem": <string>, "config": <array or null>}`. A missing `config`
/// is taken as null (SPDK requires the key; accepting its absence is harmless).
fn decode_subsystem(v: Value) -> Result<SubsystemConfig, ConfigError> {
    let bad = || ConfigError::Invalid("Failed to parse subsystem configuration".into());
    let (name, mut obj) = named_object(v, ["subsystem", "config"]).ok_or_else(bad)?;
    let items = match obj.remove("config") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .into_iter()
            .map(|v| match v {
                Value::Array(batch) => batch
                    .into_iter()
                    .map(decode_entry)
                    .collect::<Result<Vec<_>, _>>()
                    .map(Item::Batch),
                v => decode_entry(v).map(Item::One),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(bad()),
    };
    Ok(SubsystemConfig { name, items })
}

fn parse_config(text: &str) -> Result<Vec<SubsystemConfig>, ConfigError> {
    let text = strip_comments(text)?;
    if text.trim().is_empty() {
        return Err(ConfigError::Parse("JSON data cannot be empty".into()));
    }
    let StrictValue(root) =
        serde_json::from_str(&text).map_err(|e| ConfigError::Parse(e.to_string()))?;
    let Value::Object(mut root) = root else {
        return Err(ConfigError::Invalid("not enclosed in {}.".into()));
    };
    // Only `subsystems` is used; anything else in the root is ignored.
    match root.remove("subsystems") {
        None => {
            tracing::warn!("No 'subsystems' key JSON configuration file.");
            Ok(Vec::new())
        }
        Some(Value::Array(subs)) => {
            if subs.is_empty() {
                tracing::info!("'subsystems' configuration is empty");
            }
            subs.into_iter().map(decode_subsystem).collect()
        }
        Some(_) => Err(ConfigError::Invalid(
            "'subsystems' should be an array.".into(),
        )),
    }
}

/// Whether `e` runs in the pass for state `cur` (json_config.c's checks).
fn runs_in(e: &Entry, subsystem: &str, cur: u32, first_pass: bool) -> Result<bool, ConfigError> {
    let Some(mask) = method_mask(&e.method) else {
        if !subsystem_exists(subsystem) {
            if first_pass {
                tracing::info!(
                    method = %e.method,
                    subsystem,
                    "Skipping method as its subsystem is not present"
                );
            }
            return Ok(false);
        }
        tracing::error!(method = %e.method, "Method was not found");
        return Err(ConfigError::MethodNotFound(e.method.clone()));
    };
    if mask & cur != cur {
        tracing::debug!(method = %e.method, "method not allowed in this state -> skipping");
        return Ok(false);
    }
    // Allowed in both states: it already ran in the STARTUP pass (SPDK skips
    // these in any RUNTIME pass, also when the load started in RUNTIME).
    if mask & (STARTUP | RUNTIME) == (STARTUP | RUNTIME) && cur == RUNTIME {
        return Ok(false);
    }
    Ok(true)
}

async fn run_entry(e: &Entry, ignore_errors: bool) -> Result<(), ConfigError> {
    tracing::debug!(method = %e.method, "config: calling");
    if let Err(error) = dispatch(&e.method, e.params.clone(), e.dup).await {
        tracing::error!(method = %e.method, code = error.code, message = %error.message, "error response");
        if !ignore_errors {
            return Err(ConfigError::Rpc {
                method: e.method.clone(),
                error,
            });
        }
    }
    Ok(())
}

async fn run_pass(
    subs: &[SubsystemConfig],
    cur: u32,
    first_pass: bool,
    ignore_errors: bool,
) -> Result<(), ConfigError> {
    for sub in subs {
        tracing::debug!(subsystem = %sub.name, "Loading subsystem configuration");
        for item in &sub.items {
            match item {
                Item::One(e) => {
                    if runs_in(e, &sub.name, cur, first_pass)? {
                        run_entry(e, ignore_errors).await?;
                    }
                }
                Item::Batch(batch) => {
                    // Filter first, as the whole batch is one request in SPDK.
                    let mut run = Vec::with_capacity(batch.len());
                    for e in batch {
                        if runs_in(e, &sub.name, cur, first_pass)? {
                            run.push(e);
                        }
                    }
                    for e in run {
                        run_entry(e, ignore_errors).await?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Load an SPDK JSON config (`{"subsystems":[{"subsystem":..,"config":[..]}]}`,
/// comments allowed) in SPDK's two passes. In STARTUP: pass 1 runs the
/// STARTUP-capable methods, then `start_init` runs (the app initialises its
/// subsystems; the state is then set to RUNTIME here too), then pass 2 runs
/// the RUNTIME methods except those allowed in both states. If the state is
/// already RUNTIME, only that RUNTIME pass runs (both-state methods skipped,
/// as in SPDK) and `start_init` is not awaited.
///
/// A method of a subsystem that is not registered is skipped with a notice;
/// an unknown method of a registered one fails the load. An error response
/// fails the load unless `ignore_errors`. Await it on reactor 0.
pub async fn load_json_config(
    text: &str,
    ignore_errors: bool,
    start_init: impl Future<Output = Result<(), String>>,
) -> Result<(), ConfigError> {
    let subs = parse_config(text)?;
    let cur = state();
    run_pass(&subs, cur, true, ignore_errors).await?;
    if cur == STARTUP {
        tracing::debug!("No more entries for current state, initialising subsystems");
        start_init.await.map_err(ConfigError::Init)?;
        set_state(RUNTIME);
        run_pass(&subs, RUNTIME, false, ignore_errors).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn comments_outside_strings_are_removed() {
        let text = r#"// leading comment
{
  /* block
     comment */ "subsystems": [ // trailing
    {"subsystem": "bdev", "config": [
      {"method": "m", "params": {"path": "/tmp//x", "s": "a /* not */ b", "q": "\"//\""}}
    ]}
  ]
}
// end"#;
        let stripped = strip_comments(text).unwrap();
        let v: Value = serde_json::from_str(&stripped).unwrap();
        assert_eq!(
            v,
            json!({"subsystems": [{"subsystem": "bdev", "config": [
                {"method": "m", "params": {"path": "/tmp//x", "s": "a /* not */ b", "q": "\"//\""}}
            ]}]})
        );
    }

    #[test]
    fn block_comment_does_not_join_tokens() {
        assert_eq!(strip_comments("1/**/2").unwrap(), "1 2");
        assert_eq!(strip_comments("{\"a\":1}//x").unwrap(), "{\"a\":1}");
        assert_eq!(strip_comments("ä/*ö*/ü").unwrap(), "ä ü");
        assert!(matches!(
            strip_comments("{/* open"),
            Err(ConfigError::Parse(_))
        ));
    }

    #[test]
    fn structure_errors() {
        assert!(matches!(parse_config(""), Err(ConfigError::Parse(_))));
        assert!(matches!(parse_config("[1]"), Err(ConfigError::Invalid(_))));
        assert!(matches!(
            parse_config(r#"{"subsystems": {}}"#),
            Err(ConfigError::Invalid(_))
        ));
        assert!(parse_config(r#"{"other": 1}"#).unwrap().is_empty());
        assert!(matches!(
            parse_config(r#"{"subsystems": [{"subsystem": "a", "config": [{"method": 1}]}]}"#),
            Err(ConfigError::Invalid(_))
        ));
        assert!(matches!(
            parse_config(
                r#"{"subsystems": [{"subsystem": "a", "config": [{"method": "m", "x": 1}]}]}"#
            ),
            Err(ConfigError::Invalid(_))
        ));
        assert!(matches!(
            parse_config(
                r#"{"subsystems": [{"subsystem": "a", "config": [{"method": "m", "params": []}]}]}"#
            ),
            Err(ConfigError::Invalid(_))
        ));
        let subs = parse_config(
            r#"{"subsystems": [{"subsystem": "a", "config": null},
                {"subsystem": "b", "config": [{"method": "m"}, [{"method": "n", "params": {"x": 1, "x": 2}}]]}]}"#,
        )
        .unwrap();
        assert_eq!(subs.len(), 2);
        assert!(subs[0].items.is_empty());
        match &subs[1].items[1] {
            Item::Batch(b) => assert!(b[0].dup),
            other => panic!("expected batch, got {other:?}"),
        }
    }
}
