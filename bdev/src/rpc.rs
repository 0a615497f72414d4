//! The bdev layer's own RPCs (`bdev_get_bdevs`, `bdev_get_iostat`, ...)
//! and the `bdev` subsystem's `save_config` section.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::rpc::{register_typed, DecodeError, RpcError, RUNTIME, STARTUP};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::{Bdev, IoType, QosLimits};

/// `bdev_set_options`, kept so `save_config` emits what was set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BdevOptions {
    pub bdev_io_pool_size: u32,
    pub bdev_io_cache_size: u32,
    pub bdev_auto_examine: bool,
    pub iobuf_small_cache_size: u32,
    pub iobuf_large_cache_size: u32,
}

static OPTIONS: Mutex<BdevOptions> = Mutex::new(BdevOptions {
    bdev_io_pool_size: 65535,
    bdev_io_cache_size: 256,
    bdev_auto_examine: true,
    iobuf_small_cache_size: 128,
    iobuf_large_cache_size: 16,
});

/// Names given to `bdev_examine` while auto-examine is off.
static EXAMINE_ALLOWLIST: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Whether a newly registered bdev is examined (auto-examine, or on the
/// `bdev_examine` allow-list).
pub fn examine_allowed(name: &str) -> bool {
    options().bdev_auto_examine
        || reactor::sync::lock(&EXAMINE_ALLOWLIST)
            .iter()
            .any(|n| n == name)
}

pub fn options() -> BdevOptions {
    reactor::sync::lock(&OPTIONS).clone()
}

const ALL_IO_TYPE_KEYS: [&str; 22] = [
    "read",
    "write",
    "unmap",
    "flush",
    "reset",
    "nvme_admin",
    "nvme_io",
    "nvme_io_md",
    "write_zeroes",
    "zcopy",
    "get_zone_info",
    "zone_management",
    "zone_append",
    "compare",
    "compare_and_write",
    "abort",
    "seek_hole",
    "seek_data",
    "copy",
    "nvme_iov_md",
    "nvme_nssr",
    "write_uncorrectable",
];

/// One `bdev_get_bdevs` element, in SPDK's field order.
pub fn bdev_info_json(b: &Bdev) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), json!(b.name()));
    m.insert("aliases".into(), json!(b.aliases()));
    m.insert("product_name".into(), json!(b.product_name()));
    m.insert("block_size".into(), json!(b.block_size()));
    m.insert("num_blocks".into(), json!(b.num_blocks()));
    let h = b.io_hints();
    for (k, v) in [
        ("preferred_write_alignment", h.preferred_write_alignment),
        ("preferred_write_granularity", h.preferred_write_granularity),
        ("optimal_write_size", h.optimal_write_size),
        ("preferred_unmap_alignment", h.preferred_unmap_alignment),
        ("preferred_unmap_granularity", h.preferred_unmap_granularity),
    ] {
        m.insert(k.into(), json!(v));
    }
    m.insert("uuid".into(), json!(b.uuid().to_string()));
    let q = b.qos_limits();
    m.insert(
        "assigned_rate_limits".into(),
        json!({
            "rw_ios_per_sec": q.rw_ios_per_sec,
            "rw_mbytes_per_sec": q.rw_mbytes_per_sec,
            "r_mbytes_per_sec": q.r_mbytes_per_sec,
            "w_mbytes_per_sec": q.w_mbytes_per_sec,
        }),
    );
    let claim = b.claim_type();
    m.insert("claimed".into(), json!(claim.is_some()));
    if let Some(c) = claim {
        m.insert("claim_type".into(), json!(c.name()));
    }
    m.insert("zoned".into(), json!(false));
    let mut io = Map::new();
    for k in ALL_IO_TYPE_KEYS {
        let t = IoType::ALL.iter().find(|t| t.name() == k);
        io.insert(k.into(), json!(t.is_some_and(|t| b.io_type_supported(*t))));
    }
    m.insert("supported_io_types".into(), Value::Object(io));
    m.insert("driver_specific".into(), b.ops().dump_info_json(b));
    Value::Object(m)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetBdevs {
    name: Option<String>,
    #[serde(default)]
    timeout: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetIostat {
    names: Option<Vec<String>>,
    #[serde(default)]
    per_channel: bool,
    reset_mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetIostat {
    name: Option<String>,
    mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QosParams {
    name: String,
    rw_ios_per_sec: Option<u64>,
    rw_mbytes_per_sec: Option<u64>,
    r_mbytes_per_sec: Option<u64>,
    w_mbytes_per_sec: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetOptions {
    bdev_io_pool_size: Option<u32>,
    bdev_io_cache_size: Option<u32>,
    bdev_auto_examine: Option<bool>,
    iobuf_small_cache_size: Option<u32>,
    iobuf_large_cache_size: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameParam {
    name: String,
}

fn op_json(prefix: &str, o: &crate::stat::OpSnapshot, m: &mut Map<String, Value>) {
    m.insert(format!("{prefix}_latency_ticks"), json!(o.latency_ticks));
    m.insert(
        format!("max_{prefix}_latency_ticks"),
        json!(o.max_latency_ticks),
    );
    m.insert(
        format!("min_{prefix}_latency_ticks"),
        json!(o.min_latency_ticks),
    );
}

fn iostat_fields(s: &crate::IoStatSnapshot, m: &mut Map<String, Value>) {
    m.insert("bytes_read".into(), json!(s.read.bytes));
    m.insert("num_read_ops".into(), json!(s.read.ops));
    m.insert("bytes_written".into(), json!(s.write.bytes));
    m.insert("num_write_ops".into(), json!(s.write.ops));
    m.insert("bytes_unmapped".into(), json!(s.unmap.bytes));
    m.insert("num_unmap_ops".into(), json!(s.unmap.ops));
    m.insert("bytes_copied".into(), json!(0));
    m.insert("num_copy_ops".into(), json!(0));
    op_json("read", &s.read, m);
    op_json("write", &s.write, m);
    op_json("unmap", &s.unmap, m);
    m.insert("copy_latency_ticks".into(), json!(0));
    m.insert("max_copy_latency_ticks".into(), json!(0));
    m.insert("min_copy_latency_ticks".into(), json!(0));
    let errs = s.io_errors();
    if !errs.is_empty() {
        let mut e = Map::new();
        for (k, v) in errs {
            e.insert(k.into(), json!(v));
        }
        m.insert("io_error".into(), Value::Object(e));
    }
}

fn find(name: &str) -> Result<std::sync::Arc<Bdev>, RpcError> {
    crate::get(name)
        .filter(|b| !b.is_removing())
        .ok_or_else(|| RpcError::errno(libc::ENODEV))
}

fn apply_reset(b: &Bdev, mode: Option<&str>) {
    match mode {
        Some("all") => b.stats.reset(),
        Some("maxmin") => b.stats.reset_maxmin(),
        Some("error") => b.stats.reset_errors(),
        _ => {}
    }
}

fn check_reset_mode(mode: &Option<String>) -> Result<(), RpcError> {
    match mode.as_deref() {
        None | Some("all") | Some("maxmin") | Some("error") | Some("none") => Ok(()),
        Some(_) => Err(RpcError::decode_failed()),
    }
}

/// `{"name"}`: the params of every module's delete and other by-name
/// methods.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameParams {
    pub name: String,
}

// The shapes every bdev module's RPCs share (SPDK's `rpc_bdev_*_create`,
// `_delete`), all RUNTIME; `on_decode_error` is the module's answer to
// undecodable params.

/// A module's create: `create` the bdev, answer its name.
pub fn register_create<P, E>(
    method: &str,
    on_decode_error: DecodeError,
    create: impl Fn(P) -> Result<Arc<Bdev>, E> + Copy + Send + Sync + 'static,
) where
    P: DeserializeOwned + 'static,
    RpcError: From<E>,
{
    register_typed(method, RUNTIME, on_decode_error, move |p: P| async move {
        Ok(create(p)?.name().to_string())
    });
}

/// A module's delete: unregister `name` if `module` made it (-19
/// otherwise), answer `true`.
pub fn register_delete(method: &str, module: &'static str, on_decode_error: DecodeError) {
    register_typed(
        method,
        RUNTIME,
        on_decode_error,
        move |p: NameParams| async move {
            crate::unregister_by_name(&p.name, module).await?;
            Ok(true)
        },
    );
}

/// A method that acts and answers `true` (SPDK's bool response).
pub fn register_action<P, F, Fut, E>(method: &str, on_decode_error: DecodeError, act: F)
where
    P: DeserializeOwned + 'static,
    F: Fn(P) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + 'static,
    RpcError: From<E>,
{
    register_typed(method, RUNTIME, on_decode_error, move |p: P| {
        let done = act(p);
        async move {
            done.await?;
            Ok(true)
        }
    });
}

/// Register the bdev layer's methods and the `bdev` subsystem.
pub fn register_methods() {
    register_typed(
        "bdev_get_bdevs",
        RUNTIME,
        DecodeError::Internal,
        rpc_bdev_get_bdevs,
    );
    register_typed(
        "bdev_get_iostat",
        RUNTIME,
        DecodeError::Internal,
        rpc_bdev_get_iostat,
    );
    register_typed(
        "bdev_reset_iostat",
        RUNTIME,
        DecodeError::Internal,
        rpc_bdev_reset_iostat,
    );
    register_typed(
        "bdev_wait_for_examine",
        RUNTIME,
        DecodeError::Internal,
        rpc_bdev_wait_for_examine,
    );
    register_typed(
        "bdev_examine",
        RUNTIME,
        DecodeError::Internal,
        rpc_bdev_examine,
    );
    register_typed(
        "bdev_set_qos_limit",
        RUNTIME,
        DecodeError::Internal,
        rpc_bdev_set_qos_limit,
    );
    register_typed(
        "bdev_set_options",
        STARTUP,
        DecodeError::Internal,
        rpc_bdev_set_options,
    );
    ::rpc::register_subsystem("bdev", &[], subsystem_config);
}

/// `bdev_get_bdevs`: every bdev, or one by name (waiting up to `timeout` ms for it).
async fn rpc_bdev_get_bdevs(p: GetBdevs) -> Result<Vec<Value>, RpcError> {
    match p.name {
        None => Ok(crate::list()
            .iter()
            .filter(|b| !b.is_removing())
            .map(|b| bdev_info_json(b))
            .collect::<Vec<_>>()),
        Some(name) => {
            let deadline = reactor::now_ns() + p.timeout.saturating_mul(1_000_000);
            loop {
                if let Ok(b) = find(&name) {
                    return Ok(vec![bdev_info_json(&b)]);
                }
                if p.timeout == 0 {
                    return Err(RpcError::errno(libc::ENODEV));
                }
                if reactor::now_ns() >= deadline {
                    return Err(RpcError::errno(libc::ETIMEDOUT));
                }
                reactor::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// `bdev_get_iostat`: I/O statistics of every bdev, of some, or per channel of one.
async fn rpc_bdev_get_iostat(p: GetIostat) -> Result<Value, RpcError> {
    check_reset_mode(&p.reset_mode)?;
    let bdevs: Vec<_> = match &p.names {
        None => crate::list()
            .into_iter()
            .filter(|b| !b.is_removing())
            .collect(),
        Some(names) => names.iter().map(|n| find(n)).collect::<Result<_, _>>()?,
    };
    if p.per_channel {
        if bdevs.len() != 1 || p.names.is_none() {
            return Err(RpcError::errno(libc::EINVAL));
        }
        let b = &bdevs[0];
        let channels: Vec<Value> = b
            .stats
            .per_channel()
            .into_iter()
            .map(|(r, s)| {
                let mut m = Map::new();
                m.insert("thread_id".into(), json!(r + 1));
                iostat_fields(&s, &mut m);
                Value::Object(m)
            })
            .collect();
        apply_reset(b, p.reset_mode.as_deref());
        return Ok(json!({
            "tick_rate": 1_000_000_000u64,
            "ticks": reactor::now_ns(),
            "name": b.name(),
            "channels": channels,
        }));
    }
    let list: Vec<Value> = bdevs
        .iter()
        .map(|b| {
            let mut m = Map::new();
            m.insert("name".into(), json!(b.name()));
            iostat_fields(&b.iostat(), &mut m);
            apply_reset(b, p.reset_mode.as_deref());
            Value::Object(m)
        })
        .collect();
    Ok(json!({
        "tick_rate": 1_000_000_000u64,
        "ticks": reactor::now_ns(),
        "bdevs": list,
    }))
}

/// `bdev_reset_iostat`: reset statistics (all, max/min, errors).
async fn rpc_bdev_reset_iostat(p: ResetIostat) -> Result<bool, RpcError> {
    if !matches!(
        p.mode.as_deref(),
        None | Some("all") | Some("maxmin") | Some("error") | Some("none")
    ) {
        return Err(RpcError::decode_failed());
    }
    let mode = p.mode.as_deref().unwrap_or("all");
    match p.name {
        Some(n) => apply_reset(&*find(&n)?, Some(mode)),
        None => {
            for b in crate::list() {
                apply_reset(&b, Some(mode));
            }
        }
    }
    Ok(true)
}

/// `bdev_wait_for_examine`: resolve once every examine finished.
async fn rpc_bdev_wait_for_examine(_: NoParams) -> Result<bool, RpcError> {
    crate::wait_for_examine().await;
    Ok(true)
}

/// `bdev_examine`: examine a bdev by name (only with auto-examine off).
async fn rpc_bdev_examine(p: NameParam) -> Result<bool, RpcError> {
    if options().bdev_auto_examine {
        return Err(RpcError::errno_msg(
            libc::EINVAL,
            "Invalid argument: manual examine is not allowed if auto examine is enabled",
        ));
    }
    // As SPDK: the name goes on the allow-list (a bdev registered
    // later is examined then) and is examined now if it exists.
    {
        let mut list = reactor::sync::lock(&EXAMINE_ALLOWLIST);
        if list.contains(&p.name) {
            return Err(RpcError::errno(libc::EEXIST));
        }
        list.push(p.name.clone());
    }
    if let Ok(b) = find(&p.name) {
        crate::run_examine(&b);
    }
    Ok(true)
}

/// `bdev_set_qos_limit`: set some of a bdev's rate limits.
async fn rpc_bdev_set_qos_limit(p: QosParams) -> Result<bool, RpcError> {
    let b = find(&p.name)?;
    if p.rw_ios_per_sec.is_none()
        && p.rw_mbytes_per_sec.is_none()
        && p.r_mbytes_per_sec.is_none()
        && p.w_mbytes_per_sec.is_none()
    {
        return Err(RpcError::errno_msg(
            libc::EINVAL,
            "No rate limits specified",
        ));
    }
    // SPDK enforces IOPS limits in units of its 1000/s minimum.
    if let Some(v) = p.rw_ios_per_sec {
        if v % 1000 != 0 {
            return Err(RpcError::invalid_params(
                "Failed to configure rate limit: Invalid argument",
            ));
        }
    }
    let old = b.qos_limits();
    b.set_qos_limits(QosLimits {
        rw_ios_per_sec: p.rw_ios_per_sec.unwrap_or(old.rw_ios_per_sec),
        rw_mbytes_per_sec: p.rw_mbytes_per_sec.unwrap_or(old.rw_mbytes_per_sec),
        r_mbytes_per_sec: p.r_mbytes_per_sec.unwrap_or(old.r_mbytes_per_sec),
        w_mbytes_per_sec: p.w_mbytes_per_sec.unwrap_or(old.w_mbytes_per_sec),
    });
    Ok(true)
}

/// `bdev_set_options` (STARTUP): the bdev layer's options.
async fn rpc_bdev_set_options(p: SetOptions) -> Result<bool, RpcError> {
    let mut o = reactor::sync::lock(&OPTIONS);
    if let Some(v) = p.bdev_io_pool_size {
        o.bdev_io_pool_size = v;
    }
    if let Some(v) = p.bdev_io_cache_size {
        o.bdev_io_cache_size = v;
    }
    if let Some(v) = p.bdev_auto_examine {
        o.bdev_auto_examine = v;
    }
    if let Some(v) = p.iobuf_small_cache_size {
        o.iobuf_small_cache_size = v;
    }
    if let Some(v) = p.iobuf_large_cache_size {
        o.iobuf_large_cache_size = v;
    }
    Ok(true)
}

/// The `bdev` section of `save_config`, in SPDK's order.
pub fn subsystem_config() -> Vec<Value> {
    let o = options();
    let mut out = vec![json!({
        "method": "bdev_set_options",
        "params": {
            "bdev_io_pool_size": o.bdev_io_pool_size,
            "bdev_io_cache_size": o.bdev_io_cache_size,
            "bdev_auto_examine": o.bdev_auto_examine,
            "iobuf_small_cache_size": o.iobuf_small_cache_size,
            "iobuf_large_cache_size": o.iobuf_large_cache_size,
        }
    })];
    for name in reactor::sync::lock(&EXAMINE_ALLOWLIST).iter() {
        out.push(json!({"method": "bdev_examine", "params": {"name": name}}));
    }
    for b in crate::list() {
        if b.is_removing() {
            continue;
        }
        if let Some(c) = b.ops().write_config_json(&b) {
            out.push(c);
        }
        let q = b.qos_limits();
        if q.any() {
            out.push(json!({
                "method": "bdev_set_qos_limit",
                "params": {
                    "name": b.name(),
                    "rw_ios_per_sec": q.rw_ios_per_sec,
                    "rw_mbytes_per_sec": q.rw_mbytes_per_sec,
                    "r_mbytes_per_sec": q.r_mbytes_per_sec,
                    "w_mbytes_per_sec": q.w_mbytes_per_sec,
                }
            }));
        }
    }
    out.push(json!({"method": "bdev_wait_for_examine"}));
    out
}
