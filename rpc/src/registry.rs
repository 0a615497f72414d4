//! Method table, init state and subsystem list (SPDK `lib/rpc/rpc.c`,
//! `lib/init/subsystem.c`), shared by every connection and the config loader.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, LazyLock, RwLock};

use serde_json::Value;

use crate::error::{RpcError, INVALID_STATE};
use crate::json::strip_dup_markers;

/// `SPDK_RPC_STARTUP`: before `framework_start_init`.
pub const STARTUP: u32 = 0x1;
/// `SPDK_RPC_RUNTIME`: after the subsystems were initialised.
pub const RUNTIME: u32 = 0x2;

pub type RpcResult = Result<Value, RpcError>;
/// A handler's future. Not `Send`: handlers run on reactor 0.
pub type HandlerFuture = Pin<Box<dyn Future<Output = RpcResult>>>;

/// Internal handler shape: params plus "the request had duplicate keys in
/// params" (the JSON parser collapses duplicates, so it reports them here;
/// typed handlers reject such requests the way SPDK's decoder does).
type Handler = Arc<dyn Fn(Option<Value>, bool) -> HandlerFuture + Send + Sync>;

struct Method {
    mask: u32,
    handler: Handler,
}

enum Entry {
    Method(Method),
    Alias {
        target: String,
        warned: Arc<AtomicBool>,
    },
}

#[derive(Default)]
struct Registry {
    /// Names in registration order, for `rpc_get_methods`.
    order: Vec<String>,
    entries: HashMap<String, Entry>,
}

static REGISTRY: LazyLock<RwLock<Registry>> = LazyLock::new(Default::default);
static STATE: AtomicU32 = AtomicU32::new(STARTUP);

fn registry_read() -> std::sync::RwLockReadGuard<'static, Registry> {
    // A panic while holding the lock cannot leave the map half-updated in a
    // harmful way (single inserts), so recover from poisoning.
    reactor::sync::read(&REGISTRY)
}

fn registry_write() -> std::sync::RwLockWriteGuard<'static, Registry> {
    reactor::sync::write(&REGISTRY)
}

fn insert(name: &str, entry: Entry) {
    let mut r = registry_write();
    if r.entries.insert(name.to_string(), entry).is_some() {
        tracing::debug!(method = name, "RPC method registered again; replacing it");
    } else {
        r.order.push(name.to_string());
    }
}

pub(crate) fn register_inner(
    name: &str,
    mask: u32,
    handler: impl Fn(Option<Value>, bool) -> HandlerFuture + Send + Sync + 'static,
) {
    insert(
        name,
        Entry::Method(Method {
            mask,
            handler: Arc::new(handler),
        }),
    );
}

/// Register a method that receives its params as given (`None` when absent
/// or `null`). `mask` is [`STARTUP`], [`RUNTIME`] or both.
pub fn register(
    name: &str,
    mask: u32,
    handler: impl Fn(Option<Value>) -> HandlerFuture + Send + Sync + 'static,
) {
    register_inner(name, mask, move |params, _dup| handler(params));
}

/// Decode params strictly into `P`; absent params decode as `{}`, a
/// non-object is a decode failure, so is a duplicate key.
pub(crate) fn decode_params<P: serde::de::DeserializeOwned>(
    method: &str,
    params: Option<Value>,
    dup: bool,
) -> Result<P, ()> {
    let params = params.unwrap_or_else(|| Value::Object(Default::default()));
    if dup {
        tracing::error!(method, "spdk_json_decode_object failed: duplicate key");
        return Err(());
    }
    if !params.is_object() {
        tracing::error!(
            method,
            "spdk_json_decode_object failed: params is not an object"
        );
        return Err(());
    }
    if let Some(key) = null_member(&params) {
        // SPDK's typed decoders accept no null (a string must be a string);
        // serde would take it as "absent" for an Option field.
        tracing::error!(method, key, "spdk_json_decode_object failed: null value");
        return Err(());
    }
    serde_json::from_value(params).map_err(|e| {
        tracing::error!(method, error = %e, "spdk_json_decode_object failed");
    })
}

/// The key of the first member (at any depth) whose value is null.
fn null_member(v: &Value) -> Option<String> {
    match v {
        Value::Object(m) => m.iter().find_map(|(k, v)| {
            if v.is_null() {
                Some(k.clone())
            } else {
                null_member(v)
            }
        }),
        Value::Array(a) => a.iter().find_map(null_member),
        _ => None,
    }
}

pub(crate) fn register_typed_inner<P, R, F, Fut>(name: &str, mask: u32, on_error: RpcError, f: F)
where
    P: serde::de::DeserializeOwned + 'static,
    R: serde::Serialize + 'static,
    F: Fn(P) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, RpcError>> + 'static,
{
    let method = name.to_string();
    register_inner(name, mask, move |params, dup| {
        match decode_params::<P>(&method, params, dup) {
            Err(()) => {
                let e = on_error.clone();
                Box::pin(async move { Err(e) })
            }
            Ok(p) => {
                let fut = f(p);
                Box::pin(async move {
                    let r = fut.await?;
                    serde_json::to_value(r)
                        .map_err(|e| RpcError::internal(format!("cannot encode result: {e}")))
                })
            }
        }
    });
}

/// Register a method whose params are decoded strictly into `P` (give `P`
/// `#[serde(deny_unknown_fields)]`). Absent params decode as `{}`, so a
/// struct of optional fields works and required fields fail; params that are
/// not an object, or repeat a key, fail too. A failure is answered with the
/// error selected by `on_decode_error`.
pub fn register_typed<P, R, F, Fut>(
    name: &str,
    mask: u32,
    on_decode_error: crate::DecodeError,
    f: F,
) where
    P: serde::de::DeserializeOwned + 'static,
    R: serde::Serialize + 'static,
    F: Fn(P) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, RpcError>> + 'static,
{
    register_typed_inner(name, mask, on_decode_error.into(), f)
}

/// Make `alias` call `target` (SPDK's deprecated aliases); listed by
/// `rpc_get_methods` only with `include_aliases`.
pub fn register_alias(alias: &str, target: &str) {
    insert(
        alias,
        Entry::Alias {
            target: target.to_string(),
            warned: Arc::new(AtomicBool::new(false)),
        },
    );
}

/// Current init state: [`STARTUP`] or [`RUNTIME`].
pub fn state() -> u32 {
    STATE.load(Ordering::SeqCst)
}

pub fn set_state(state: u32) {
    STATE.store(state, Ordering::SeqCst);
}

/// Resolve a name (following one alias) to its mask and handler.
fn lookup(name: &str) -> Option<(u32, Handler)> {
    let r = registry_read();
    match r.entries.get(name)? {
        Entry::Method(m) => Some((m.mask, m.handler.clone())),
        Entry::Alias { target, warned } => {
            if !warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(alias = name, method = %target, "RPC method alias is deprecated");
            }
            match r.entries.get(target)? {
                Entry::Method(m) => Some((m.mask, m.handler.clone())),
                Entry::Alias { .. } => None,
            }
        }
    }
}

/// The state mask of a method (aliases resolved), as
/// `spdk_rpc_get_method_state_mask`.
pub(crate) fn method_mask(name: &str) -> Option<u32> {
    let r = registry_read();
    match r.entries.get(name)? {
        Entry::Method(m) => Some(m.mask),
        Entry::Alias { target, .. } => match r.entries.get(target)? {
            Entry::Method(m) => Some(m.mask),
            Entry::Alias { .. } => None,
        },
    }
}

fn invalid_state(state: u32) -> RpcError {
    let msg = if state == STARTUP {
        "Method may only be called after framework is initialized using framework_start_init RPC."
    } else {
        "Method may only be called before framework is initialized. Use --wait-for-rpc command \
         line parameter and then issue this RPC before the framework_start_init RPC."
    };
    RpcError::new(INVALID_STATE, msg)
}

/// Dispatch with the duplicate-key flag from the wire parser.
pub(crate) async fn dispatch(method: &str, params: Option<Value>, dup: bool) -> RpcResult {
    let Some((mask, handler)) = lookup(method) else {
        return Err(RpcError::method_not_found());
    };
    let st = state();
    if mask & st != st {
        return Err(invalid_state(st));
    }
    // `null` params count as absent, as in SPDK's parse_single_request.
    let params = params.filter(|p| !p.is_null());
    // The registry lock is not held here: handlers may register methods.
    handler(params, dup).await
}

/// Dispatch one call in-process: -32601 "Method not found" for an unknown
/// name, -1 with SPDK's texts when the state mask forbids it, else the
/// handler's result. Await it on reactor 0 (handlers assume they run there).
pub async fn call(method: &str, params: Option<Value>) -> RpcResult {
    // In-process values may still carry markers if they came from our parser.
    let (params, dup) = match params {
        Some(mut p) => {
            let dup = strip_dup_markers(&mut p);
            (Some(p), dup)
        }
        None => (None, false),
    };
    dispatch(method, params, dup).await
}

/// Method names in registration order. `current_only`: only those callable
/// in the current state; `include_aliases`: aliases too.
pub fn method_names(current_only: bool, include_aliases: bool) -> Vec<String> {
    let st = state();
    let r = registry_read();
    r.order
        .iter()
        .filter(|name| {
            let mask = match r.entries.get(name.as_str()) {
                Some(Entry::Method(m)) => m.mask,
                Some(Entry::Alias { target, .. }) => {
                    if !include_aliases {
                        return false;
                    }
                    match r.entries.get(target) {
                        Some(Entry::Method(m)) => m.mask,
                        _ => return false,
                    }
                }
                None => return false,
            };
            !current_only || mask & st == st
        })
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------
// Subsystems

type ConfigFn = Arc<dyn Fn() -> Vec<Value> + Send + Sync>;

struct Subsystem {
    name: String,
    depends_on: Vec<String>,
    config: ConfigFn,
}

static SUBSYSTEMS: RwLock<Vec<Subsystem>> = RwLock::new(Vec::new());

/// Register a subsystem for `framework_get_subsystems`, `framework_get_config`
/// (hence `save_config`) and the `--json` loader's "is this subsystem present"
/// check. `config` runs on reactor 0 and returns the subsystem's config array
/// (`{"method","params"}` objects; a nested array is a batch). Registering a
/// name again replaces it in place.
pub fn register_subsystem(
    name: &str,
    depends_on: &[&str],
    config: impl Fn() -> Vec<Value> + Send + Sync + 'static,
) {
    let sub = Subsystem {
        name: name.to_string(),
        depends_on: depends_on.iter().map(|s| s.to_string()).collect(),
        config: Arc::new(config),
    };
    let mut subs = reactor::sync::write(&SUBSYSTEMS);
    match subs.iter_mut().find(|s| s.name == name) {
        Some(s) => *s = sub,
        None => subs.push(sub),
    }
}

pub(crate) fn subsystem_exists(name: &str) -> bool {
    reactor::sync::read(&SUBSYSTEMS)
        .iter()
        .any(|s| s.name == name)
}

/// `(name, depends_on)` in init order: registration order, except that a
/// subsystem is moved after the registered subsystems it depends on (SPDK
/// sorts its list the same way before init). Stable, so a registration order
/// that already respects dependencies is kept as is.
pub(crate) fn subsystems_in_order() -> Vec<(String, Vec<String>)> {
    let subs = reactor::sync::read(&SUBSYSTEMS);
    let mut pending: Vec<(String, Vec<String>)> = subs
        .iter()
        .map(|s| (s.name.clone(), s.depends_on.clone()))
        .collect();
    let known: Vec<String> = pending.iter().map(|(n, _)| n.clone()).collect();
    let mut out: Vec<(String, Vec<String>)> = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let ready = pending.iter().position(|(_, deps)| {
            deps.iter()
                .all(|d| !known.contains(d) || out.iter().any(|(n, _)| n == d))
        });
        // A dependency cycle: keep the rest in registration order.
        let i = ready.unwrap_or(0);
        out.push(pending.remove(i));
    }
    out
}

pub(crate) fn subsystem_config_fn(name: &str) -> Option<ConfigFn> {
    reactor::sync::read(&SUBSYSTEMS)
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.config.clone())
}
