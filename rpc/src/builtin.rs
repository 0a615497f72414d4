//! Methods the server itself provides (rpc-contract.md §1.6, §2.1):
//! `spdk_get_version`, `rpc_get_methods`, `framework_get_subsystems`,
//! `framework_get_config`.

use std::sync::Once;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::RpcError;
use crate::registry::{
    method_names, register, register_typed_inner, subsystem_config_fn, subsystems_in_order,
    RUNTIME, STARTUP,
};
use crate::DecodeError;

/// The SPDK release clone-tgt answers as (`include/spdk/version.h`).
pub const SPDK_VERSION_MAJOR: u32 = 26;
pub const SPDK_VERSION_MINOR: u32 = 9;
pub const SPDK_VERSION_PATCH: u32 = 0;
pub const SPDK_VERSION_SUFFIX: &str = "-pre";

/// `"SPDK v" MAJOR "." 2-digit MINOR ["." PATCH] SUFFIX` (no git sha: not an SPDK build).
pub fn version_string() -> String {
    let mut s = format!("SPDK v{SPDK_VERSION_MAJOR}.{SPDK_VERSION_MINOR:02}");
    if SPDK_VERSION_PATCH != 0 {
        s.push_str(&format!(".{SPDK_VERSION_PATCH}"));
    }
    s.push_str(SPDK_VERSION_SUFFIX);
    s
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetMethods {
    #[serde(default)]
    current: bool,
    #[serde(default)]
    include_aliases: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetConfig {
    name: String,
    #[serde(default)]
    with_batches: bool,
}

/// Nested arrays (batches) spliced into the flat list, for `with_batches: false`.
fn flatten_batches(config: Vec<Value>) -> Vec<Value> {
    let mut out = Vec::with_capacity(config.len());
    for v in config {
        match v {
            Value::Array(items) => out.extend(flatten_batches(items)),
            v => out.push(v),
        }
    }
    out
}

/// Register the generic methods. Idempotent.
pub fn register_builtin_methods() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        register("spdk_get_version", STARTUP | RUNTIME, |params| {
            Box::pin(async move {
                if params.is_some() {
                    return Err(RpcError::invalid_params(
                        "spdk_get_version method requires no parameters",
                    ));
                }
                Ok(json!({
                    "version": version_string(),
                    "fields": {
                        "major": SPDK_VERSION_MAJOR,
                        "minor": SPDK_VERSION_MINOR,
                        "patch": SPDK_VERSION_PATCH,
                        "suffix": SPDK_VERSION_SUFFIX,
                    }
                }))
            })
        });

        register_typed_inner(
            "rpc_get_methods",
            STARTUP | RUNTIME,
            DecodeError::InvalidParams.into(),
            |p: GetMethods| async move {
                Ok::<_, RpcError>(method_names(p.current, p.include_aliases))
            },
        );

        register("framework_get_subsystems", RUNTIME, |params| {
            Box::pin(async move {
                if params.is_some() {
                    return Err(RpcError::invalid_params(
                        "'framework_get_subsystems' requires no arguments",
                    ));
                }
                let list: Vec<Value> = subsystems_in_order()
                    .into_iter()
                    .map(|(name, deps)| json!({"subsystem": name, "depends_on": deps}))
                    .collect();
                Ok(Value::Array(list))
            })
        });

        // SPDK answers a decode failure here with its own text.
        register_typed_inner(
            "framework_get_config",
            RUNTIME,
            RpcError::invalid_params("Invalid arguments"),
            |p: GetConfig| async move {
                let Some(config) = subsystem_config_fn(&p.name) else {
                    return Err(RpcError::invalid_params(format!(
                        "Subsystem '{}' not found",
                        p.name
                    )));
                };
                let list = config();
                Ok(if p.with_batches {
                    list
                } else {
                    flatten_batches(list)
                })
            },
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_format() {
        assert_eq!(version_string(), "SPDK v26.09-pre");
    }

    #[test]
    fn flatten() {
        let v = vec![json!({"a":1}), json!([{"b":2}, {"c":3}]), json!({"d":4})];
        assert_eq!(
            flatten_batches(v),
            vec![
                json!({"a":1}),
                json!({"b":2}),
                json!({"c":3}),
                json!({"d":4})
            ]
        );
    }
}
