//! The clone module's RPCs (rpc-contract §2.7). All are RUNTIME methods;
//! undecodable params get -32602.

use ::rpc::{register_typed, DecodeError, RpcError, RUNTIME};
use serde::Deserialize;

use crate::error::CloneError;
use crate::module::{self, CreateOpts, HydrationOpts};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteParams {
    pub name: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GetBdevsParams {
    #[serde(default)]
    pub name: Option<String>,
}

/// Register `bdev_clone_create`, `_delete`, `_get_bdevs`, `_set_hydration`.
pub fn register_rpcs() {
    register_typed(
        "bdev_clone_create",
        RUNTIME,
        DecodeError::InvalidParams,
        |p: CreateOpts| async move {
            let b = module::create(p).await?;
            Ok(b.name().to_string())
        },
    );
    register_typed(
        "bdev_clone_delete",
        RUNTIME,
        DecodeError::InvalidParams,
        |p: DeleteParams| async move {
            module::delete(&p.name).await?;
            Ok(true)
        },
    );
    register_typed(
        "bdev_clone_get_bdevs",
        RUNTIME,
        DecodeError::InvalidParams,
        |p: GetBdevsParams| async move {
            match p.name {
                Some(n) => {
                    let s = module::status(&n).ok_or(CloneError::NoSuchClone(n))?;
                    Ok(vec![s])
                }
                None => Ok(module::status_all()),
            }
        },
    );
    register_typed(
        "bdev_clone_set_hydration",
        RUNTIME,
        DecodeError::InvalidParams,
        |p: HydrationOpts| async move {
            module::set_hydration(&p).map_err(RpcError::from)?;
            Ok(true)
        },
    );
}
