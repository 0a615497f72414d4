//! `bdev_nvme_attach_controller`, `bdev_nvme_detach_controller` and
//! `bdev_nvme_get_controllers` with SPDK's parameters, results and errors
//! (rpc-contract.md §2.4, rpc-params.md).

use std::time::Duration;

use ::rpc::{register_typed, DecodeError, RpcError, RUNTIME};
use serde::Deserialize;
use serde_json::{json, Value};

use super::ctrlr::{self, AttachOpts, DEFAULT_KATO_MS};
use super::nvme_bdev::trid_json;
use super::HostError;
use crate::spec::DISCOVERY_NQN;

/// SPDK's default host NQN form (a UUID NQN, fixed for this process).
fn default_hostnqn() -> String {
    static HOSTNQN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOSTNQN
        .get_or_init(|| format!("nqn.2014-08.org.nvmexpress:uuid:{}", uuid::Uuid::new_v4()))
        .clone()
}

fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn rpc_err(e: HostError) -> RpcError {
    match &e {
        // SPDK's exact text for a taken name.
        HostError::Exists(msg) => RpcError::errno_msg(e.errno(), msg.clone()),
        HostError::NotFound(_) => RpcError::errno(e.errno()),
        _ => RpcError::errno_msg(e.errno(), format!("{}: {e}", strerror(e.errno()))),
    }
}

fn invalid(msg: impl Into<String>) -> RpcError {
    let msg = msg.into();
    RpcError::errno_msg(libc::EINVAL, format!("Invalid argument: {msg}"))
}

/// `bdev_nvme_attach_controller` params (every key SPDK's decoder knows).
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct AttachParams {
    pub name: String,
    pub trtype: String,
    pub traddr: String,
    pub adrfam: Option<String>,
    pub trsvcid: Option<String>,
    pub priority: Option<String>,
    pub subnqn: Option<String>,
    pub hostnqn: Option<String>,
    pub hostaddr: Option<String>,
    pub hostsvcid: Option<String>,
    #[serde(default)]
    pub prchk_reftag: bool,
    #[serde(default)]
    pub prchk_guard: bool,
    #[serde(default)]
    pub hdgst: bool,
    #[serde(default)]
    pub ddgst: bool,
    pub fabrics_connect_timeout_us: Option<u64>,
    pub multipath: Option<String>,
    pub num_io_queues: Option<u32>,
    pub ctrlr_loss_timeout_sec: Option<i32>,
    pub reconnect_delay_sec: Option<u32>,
    pub fast_io_fail_timeout_sec: Option<u32>,
    pub psk: Option<String>,
    pub max_bdevs: Option<u32>,
    pub dhchap_key: Option<String>,
    pub dhchap_ctrlr_key: Option<String>,
    #[serde(default)]
    pub allow_unrecognized_csi: bool,
    pub multipath_opts: Option<Value>,
    #[serde(default)]
    pub disable_sq_flow_control: bool,
}

/// SPDK's `bdev_nvme_check_io_error_resiliency_params`.
pub fn check_resiliency(loss: i32, delay: u32, fast: u32) -> Result<(), String> {
    if loss < -1 {
        return Err("ctrlr_loss_timeout_sec can't be less than -1.".into());
    }
    if loss == -1 {
        if delay == 0 {
            return Err(
                "reconnect_delay_sec can't be 0 if ctrlr_loss_timeout_sec is not 0.".into(),
            );
        }
        if fast != 0 && fast < delay {
            return Err("reconnect_delay_sec can't be more than fast_io-fail_timeout_sec.".into());
        }
    } else if loss != 0 {
        if delay == 0 {
            return Err(
                "reconnect_delay_sec can't be 0 if ctrlr_loss_timeout_sec is not 0.".into(),
            );
        }
        if delay > loss as u32 {
            return Err("reconnect_delay_sec can't be more than ctrlr_loss_timeout_sec.".into());
        }
        if fast != 0 {
            if fast < delay {
                return Err(
                    "reconnect_delay_sec can't be more than fast_io-fail_timeout_sec.".into(),
                );
            }
            if fast > loss as u32 {
                return Err(
                    "fast_io-fail_timeout_sec can't be more than ctrlr_loss_timeout_sec.".into(),
                );
            }
        }
    } else if delay != 0 || fast != 0 {
        return Err(
            "Both reconnect_delay_sec and fast_io_fail_timeout_sec must be 0 if ctrlr_loss_timeout_sec is 0."
                .into(),
        );
    }
    Ok(())
}

/// Turn params into options, refusing what this host does not implement
/// rather than ignoring it.
pub fn attach_opts(p: AttachParams) -> Result<AttachOpts, RpcError> {
    if !p.trtype.eq_ignore_ascii_case("tcp") {
        return Err(invalid(format!(
            "Failed to parse trtype: {} (only TCP is supported)",
            p.trtype
        )));
    }
    if p.name.is_empty() {
        return Err(invalid("name must not be empty"));
    }
    let adrfam = match p.adrfam.as_deref().map(|s| s.to_ascii_lowercase()) {
        None => {
            if p.traddr.contains(':') {
                "IPv6"
            } else {
                "IPv4"
            }
        }
        Some(a) if a == "ipv4" => "IPv4",
        Some(a) if a == "ipv6" => "IPv6",
        Some(a) => return Err(invalid(format!("Failed to parse adrfam: {a}"))),
    };
    for (k, v) in [
        ("psk", p.psk.is_some()),
        ("dhchap_key", p.dhchap_key.is_some()),
        ("dhchap_ctrlr_key", p.dhchap_ctrlr_key.is_some()),
        ("prchk_reftag", p.prchk_reftag),
        ("prchk_guard", p.prchk_guard),
        ("hostaddr", p.hostaddr.is_some()),
        ("hostsvcid", p.hostsvcid.is_some()),
        ("disable_sq_flow_control", p.disable_sq_flow_control),
        ("multipath_opts", p.multipath_opts.is_some()),
    ] {
        if v {
            return Err(invalid(format!(
                "{k} is not supported by this NVMe/TCP host"
            )));
        }
    }
    if let Some(m) = p.multipath.as_deref() {
        if !matches!(m, "disable" | "failover" | "multipath") {
            return Err(invalid(format!("Invalid multipath parameter: {m}")));
        }
    }
    let dflt = defaults();
    let loss = p
        .ctrlr_loss_timeout_sec
        .unwrap_or(dflt.ctrlr_loss_timeout_sec);
    let delay = p.reconnect_delay_sec.unwrap_or(dflt.reconnect_delay_sec);
    let fast = p
        .fast_io_fail_timeout_sec
        .unwrap_or(dflt.fast_io_fail_timeout_sec);
    check_resiliency(loss, delay, fast).map_err(invalid)?;
    let num_io_queues = p.num_io_queues.unwrap_or(1024);
    if num_io_queues == 0 || num_io_queues > 0xFFFF {
        return Err(invalid(format!(
            "num_io_queues {num_io_queues} is out of range 1..65535"
        )));
    }
    let subnqn = p.subnqn.unwrap_or_else(|| DISCOVERY_NQN.to_string());
    if subnqn.is_empty() || subnqn.len() > 223 {
        return Err(invalid("subnqn must be 1..223 characters"));
    }
    let hostnqn = p.hostnqn.unwrap_or_else(default_hostnqn);
    if hostnqn.is_empty() || hostnqn.len() > 223 {
        return Err(invalid("hostnqn must be 1..223 characters"));
    }
    let connect_timeout = match p.fabrics_connect_timeout_us {
        Some(0) | None => Duration::from_millis(dflt.tcp_connect_timeout_ms.max(1) as u64),
        Some(us) => Duration::from_micros(us),
    };
    Ok(AttachOpts {
        name: p.name,
        trsvcid: p.trsvcid.unwrap_or_else(|| "4420".to_string()),
        traddr: p.traddr,
        adrfam: adrfam.to_string(),
        subnqn,
        hostnqn,
        hdgst: p.hdgst,
        ddgst: p.ddgst,
        num_io_queues,
        ctrlr_loss_timeout_sec: loss,
        reconnect_delay_sec: delay,
        fast_io_fail_timeout_sec: fast,
        connect_timeout,
        kato_ms: dflt.keep_alive_timeout_ms,
    })
}

/// `bdev_nvme_set_options`: the subset this host implements. Other SPDK
/// keys are refused by the strict decoder rather than silently ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetOptions {
    keep_alive_timeout_ms: Option<u32>,
    ctrlr_loss_timeout_sec: Option<i32>,
    reconnect_delay_sec: Option<u32>,
    fast_io_fail_timeout_sec: Option<u32>,
    tcp_connect_timeout_ms: Option<u32>,
}

/// Module defaults (`bdev_nvme_set_options`), used by attaches that do not
/// say otherwise.
#[derive(Clone, Copy, Debug)]
pub struct Defaults {
    pub keep_alive_timeout_ms: u32,
    pub ctrlr_loss_timeout_sec: i32,
    pub reconnect_delay_sec: u32,
    pub fast_io_fail_timeout_sec: u32,
    pub tcp_connect_timeout_ms: u32,
}

static DEFAULTS: std::sync::Mutex<Defaults> = std::sync::Mutex::new(Defaults {
    keep_alive_timeout_ms: DEFAULT_KATO_MS,
    ctrlr_loss_timeout_sec: 0,
    reconnect_delay_sec: 0,
    fast_io_fail_timeout_sec: 0,
    tcp_connect_timeout_ms: 10_000,
});

pub fn defaults() -> Defaults {
    *reactor::sync::lock(&DEFAULTS)
}

fn set_options(p: SetOptions) -> Result<(), RpcError> {
    if !ctrlr::all().is_empty() {
        return Err(RpcError::errno_msg(
            libc::EPERM,
            "Operation not permitted: bdev_nvme_set_options is refused while controllers are attached",
        ));
    }
    let d = given_or!(Defaults {
        keep_alive_timeout_ms,
        ctrlr_loss_timeout_sec,
        reconnect_delay_sec,
        fast_io_fail_timeout_sec,
        tcp_connect_timeout_ms,
    } from p, else defaults());
    check_resiliency(
        d.ctrlr_loss_timeout_sec,
        d.reconnect_delay_sec,
        d.fast_io_fail_timeout_sec,
    )
    .map_err(invalid)?;
    *reactor::sync::lock(&DEFAULTS) = d;
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetachParams {
    name: String,
    trtype: Option<String>,
    traddr: Option<String>,
    adrfam: Option<String>,
    trsvcid: Option<String>,
    subnqn: Option<String>,
    hostaddr: Option<String>,
    hostsvcid: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetParams {
    name: String,
    /// Only reset the path to this controller ID.
    cntlid: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetParams {
    name: Option<String>,
}

fn controller_json(c: &ctrlr::Ctrlr) -> Value {
    let d = c.data();
    json!({
        "name": c.opts.name,
        "ctrlrs": [{
            "state": c.state_name(),
            "trid": trid_json(c),
            "cntlid": d.cntlid,
            "host": {"nqn": c.opts.hostnqn, "addr": "", "svcid": ""},
        }]
    })
}

pub fn register_methods() {
    register_typed(
        "bdev_nvme_set_options",
        ::rpc::STARTUP | RUNTIME,
        DecodeError::Internal,
        |p: SetOptions| async move {
            set_options(p)?;
            Ok(true)
        },
    );
    register_typed(
        "bdev_nvme_attach_controller",
        RUNTIME,
        DecodeError::Internal,
        |p: AttachParams| async move {
            let opts = attach_opts(p)?;
            let names = ctrlr::attach(opts).await.map_err(rpc_err)?;
            bdev::wait_for_examine().await;
            Ok(names)
        },
    );
    register_typed(
        "bdev_nvme_detach_controller",
        RUNTIME,
        DecodeError::Internal,
        |p: DetachParams| async move {
            let c = ctrlr::find(&p.name).ok_or_else(|| RpcError::errno(libc::ENODEV))?;
            // A path filter must match this controller's only path.
            let o = &c.opts;
            let matches = p
                .trtype
                .as_deref()
                .is_none_or(|t| t.eq_ignore_ascii_case("tcp"))
                && p.traddr.as_deref().is_none_or(|t| t == o.traddr)
                && p.adrfam
                    .as_deref()
                    .is_none_or(|a| a.eq_ignore_ascii_case(&o.adrfam))
                && p.trsvcid.as_deref().is_none_or(|s| s == o.trsvcid)
                && p.subnqn.as_deref().is_none_or(|s| s == o.subnqn)
                && p.hostaddr.as_deref().is_none_or(str::is_empty)
                && p.hostsvcid.as_deref().is_none_or(str::is_empty);
            if !matches {
                return Err(RpcError::errno(libc::ENODEV));
            }
            ctrlr::detach(&p.name).await.map_err(rpc_err)?;
            Ok(true)
        },
    );
    register_typed(
        "bdev_nvme_reset_controller",
        RUNTIME,
        DecodeError::Internal,
        |p: ResetParams| async move {
            if let Some(id) = p.cntlid {
                let c = ctrlr::find(&p.name).ok_or_else(|| RpcError::errno(libc::ENODEV))?;
                if c.data().cntlid != id {
                    return Err(RpcError::errno(libc::ENODEV));
                }
            }
            match ctrlr::reset(&p.name).await {
                Ok(()) => Ok(true),
                Err(HostError::NotFound(_)) => Err(RpcError::errno(libc::ENODEV)),
                Err(HostError::Busy) => Err(RpcError::errno(libc::EBUSY)),
                Err(e) => Err(rpc_err(e)),
            }
        },
    );
    register_typed(
        "bdev_nvme_get_controllers",
        RUNTIME,
        DecodeError::Internal,
        |p: GetParams| async move {
            let list: Vec<Value> = match p.name {
                Some(n) => {
                    let c = ctrlr::find(&n).ok_or_else(|| RpcError::errno(libc::ENODEV))?;
                    vec![controller_json(&c)]
                }
                None => ctrlr::all().iter().map(|c| controller_json(c)).collect(),
            };
            Ok(list)
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: Value) -> Result<AttachParams, serde_json::Error> {
        serde_json::from_value(v)
    }

    #[test]
    fn resiliency_rules_match_spdk() {
        assert!(check_resiliency(0, 0, 0).is_ok());
        assert!(check_resiliency(-1, 1, 0).is_ok());
        assert!(check_resiliency(10, 2, 5).is_ok());
        assert!(check_resiliency(-2, 1, 0).is_err());
        assert!(check_resiliency(-1, 0, 0).is_err());
        assert!(check_resiliency(10, 0, 0).is_err());
        assert!(check_resiliency(10, 11, 0).is_err());
        assert!(check_resiliency(10, 5, 3).is_err());
        assert!(check_resiliency(10, 2, 11).is_err());
        assert!(check_resiliency(0, 1, 0).is_err());
        assert!(check_resiliency(0, 0, 1).is_err());
    }

    #[test]
    fn attach_params_decode_and_check() {
        // What spdk-rpc sends: explicit false for every flag not given.
        let p = params(json!({
            "name": "Nvme0", "trtype": "tcp", "traddr": "127.0.0.1", "adrfam": "ipv4",
            "trsvcid": "4420", "subnqn": "nqn.x", "prchk_reftag": false, "prchk_guard": false,
            "hdgst": false, "ddgst": false, "allow_unrecognized_csi": false,
            "disable_sq_flow_control": false
        }))
        .unwrap();
        let o = attach_opts(p).unwrap();
        assert_eq!((o.adrfam.as_str(), o.trsvcid.as_str()), ("IPv4", "4420"));
        assert_eq!(o.ctrlr_loss_timeout_sec, 0);
        // Unknown keys are refused, as SPDK's decoder does.
        assert!(params(json!({"name": "a", "trtype": "tcp", "traddr": "x", "bogus": 1})).is_err());
        // Negative unsigned values are refused.
        assert!(params(
            json!({"name": "a", "trtype": "tcp", "traddr": "x", "reconnect_delay_sec": -1})
        )
        .is_err());
        let bad = |v: Value| attach_opts(params(v).unwrap()).unwrap_err().message;
        assert!(bad(json!({"name": "a", "trtype": "rdma", "traddr": "x"})).contains("trtype"));
        assert!(
            bad(json!({"name": "a", "trtype": "tcp", "traddr": "x", "adrfam": "ib"}))
                .contains("adrfam")
        );
        assert!(
            bad(json!({"name": "a", "trtype": "tcp", "traddr": "x", "psk": "k"})).contains("psk")
        );
        assert!(bad(
            json!({"name": "a", "trtype": "tcp", "traddr": "x", "ctrlr_loss_timeout_sec": 5})
        )
        .contains("reconnect_delay_sec"));
        let p = params(json!({"name": "a", "trtype": "TCP", "traddr": "::1"})).unwrap();
        let o = attach_opts(p).unwrap();
        assert_eq!(o.adrfam, "IPv6");
        assert_eq!(o.subnqn, DISCOVERY_NQN);
        assert!(o.hostnqn.starts_with("nqn.2014-08.org.nvmexpress:uuid:"));
    }
}
