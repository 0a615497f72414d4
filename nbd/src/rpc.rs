//! JSON-RPC methods: `bdev_nbd_create`, `bdev_nbd_delete`,
//! `nbd_server_start`, `nbd_server_stop`, `nbd_export_add`,
//! `nbd_export_remove`, `nbd_get_exports`; and the `nbd` subsystem, whose
//! `save_config` section re-creates the server and its exports.

use ::rpc::{register_typed, DecodeError, RpcError, RUNTIME};
use serde::Deserialize;

use crate::client::{self, ClientOpts};
use crate::{server, uri, NbdError};

/// `bdev_nbd_create` params.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    pub name: String,
    pub uri: String,
    #[serde(default)]
    pub read_only: bool,
    pub connections: Option<u32>,
    pub block_size: Option<u32>,
    pub connect_timeout_ms: Option<u64>,
    pub io_timeout_ms: Option<u64>,
    pub reconnect_delay_ms: Option<u64>,
    pub fast_io_fail_timeout_ms: Option<u64>,
}

pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_IO_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_RECONNECT_DELAY_MS: u64 = 1_000;
pub const DEFAULT_FAST_IO_FAIL_TIMEOUT_MS: u64 = 10_000;
pub const MAX_CONNECTIONS: u32 = 16;

/// Check params and fill defaults; the error names the bad one.
pub fn create_opts(p: CreateParams) -> Result<ClientOpts, NbdError> {
    if p.name.is_empty() {
        return Err(NbdError::Invalid("name must not be empty".into()));
    }
    let target = uri::parse(&p.uri).map_err(NbdError::Invalid)?;
    let connections = p.connections.unwrap_or(1);
    if connections == 0 || connections > MAX_CONNECTIONS {
        return Err(NbdError::Invalid(format!(
            "connections {connections} is out of range 1..{MAX_CONNECTIONS}"
        )));
    }
    let block_size = p.block_size.unwrap_or(512);
    if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
        return Err(NbdError::Invalid(format!(
            "block_size {block_size} is not a power of two from 512 to 65536"
        )));
    }
    let connect_timeout_ms = p.connect_timeout_ms.unwrap_or(DEFAULT_CONNECT_TIMEOUT_MS);
    if connect_timeout_ms == 0 {
        return Err(NbdError::Invalid(
            "connect_timeout_ms must be at least 1".into(),
        ));
    }
    let reconnect_delay_ms = p.reconnect_delay_ms.unwrap_or(DEFAULT_RECONNECT_DELAY_MS);
    if reconnect_delay_ms == 0 {
        return Err(NbdError::Invalid(
            "reconnect_delay_ms must be at least 1".into(),
        ));
    }
    Ok(ClientOpts {
        name: p.name,
        uri: p.uri,
        target,
        read_only: p.read_only,
        connections,
        block_size,
        connect_timeout_ms,
        io_timeout_ms: p.io_timeout_ms.unwrap_or(DEFAULT_IO_TIMEOUT_MS),
        reconnect_delay_ms,
        fast_io_fail_timeout_ms: p
            .fast_io_fail_timeout_ms
            .unwrap_or(DEFAULT_FAST_IO_FAIL_TIMEOUT_MS),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameParams {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartParams {
    listen: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportAddParams {
    bdev_name: String,
    name: Option<String>,
    #[serde(default)]
    writable: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GetExportsParams {
    name: Option<String>,
}

pub fn register_methods() {
    register_typed(
        "bdev_nbd_create",
        RUNTIME,
        DecodeError::Internal,
        |p: CreateParams| async move {
            let o = create_opts(p)?;
            let name = client::create(o).await?;
            bdev::wait_for_examine().await;
            Ok(name)
        },
    );
    register_typed(
        "bdev_nbd_delete",
        RUNTIME,
        DecodeError::Internal,
        |p: NameParams| async move {
            bdev::unregister_by_name(&p.name, client::MODULE_NAME)
                .await
                .map_err(|_| RpcError::errno(libc::ENODEV))?;
            Ok(true)
        },
    );
    register_typed(
        "nbd_server_start",
        RUNTIME,
        DecodeError::Internal,
        |p: StartParams| async move {
            server::start(&p.listen)?;
            Ok(true)
        },
    );
    register_typed(
        "nbd_server_stop",
        RUNTIME,
        DecodeError::Internal,
        |_p: Option<serde_json::Value>| async move {
            server::stop().await?;
            Ok(true)
        },
    );
    register_typed(
        "nbd_export_add",
        RUNTIME,
        DecodeError::Internal,
        |p: ExportAddParams| async move { Ok(server::export_add(&p.bdev_name, p.name, p.writable)?) },
    );
    register_typed(
        "nbd_export_remove",
        RUNTIME,
        DecodeError::Internal,
        |p: NameParams| async move {
            server::export_remove(&p.name).await?;
            Ok(true)
        },
    );
    register_typed(
        "nbd_get_exports",
        RUNTIME,
        DecodeError::Internal,
        |p: Option<GetExportsParams>| async move {
            let all = server::exports_json();
            let p = p.unwrap_or_default();
            match p.name {
                Some(n) => {
                    let one: Vec<_> = all
                        .into_iter()
                        .filter(|e| e["name"] == n.as_str())
                        .collect();
                    if one.is_empty() {
                        return Err(RpcError::errno(libc::ENODEV));
                    }
                    Ok(serde_json::json!({"listen": server::listeners(), "exports": one}))
                }
                None => Ok(serde_json::json!({"listen": server::listeners(), "exports": all})),
            }
        },
    );
    ::rpc::register_subsystem("nbd", &["bdev"], server::config_json);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn opts(v: serde_json::Value) -> Result<ClientOpts, String> {
        let p: CreateParams = serde_json::from_value(v).map_err(|e| e.to_string())?;
        create_opts(p).map_err(|e| e.to_string())
    }

    #[test]
    fn create_params() {
        let o = opts(json!({"name": "n", "uri": "nbd://127.0.0.1:1234/x"})).unwrap();
        assert_eq!((o.connections, o.block_size, o.read_only), (1, 512, false));
        // Each bad param is refused with an error that names it.
        let bad = [
            (json!({"name": "n", "uri": "http://x"}), "scheme"),
            (
                json!({"name": "n", "uri": "nbd://x", "connections": 0}),
                "connections",
            ),
            (
                json!({"name": "n", "uri": "nbd://x", "block_size": 1000}),
                "block_size",
            ),
            (json!({"name": "n", "uri": "nbd://x", "bogus": 1}), "bogus"),
            (json!({"name": "", "uri": "nbd://x"}), "name"),
            (
                json!({"name": "n", "uri": "nbd://x", "reconnect_delay_ms": 0}),
                "reconnect_delay_ms",
            ),
        ];
        for (params, names) in bad {
            let e = opts(params.clone()).expect_err(&params.to_string());
            assert!(e.contains(names), "{params}: {e}");
        }
    }
}
