//! The clone module's RPCs (rpc-contract §2.7): every param struct and the
//! registration. All are RUNTIME methods; undecodable params get -32602.

use ::rpc::{register_typed, DecodeError, RUNTIME};
use bdev::rpc::{register_action, NameParams};
use serde::Deserialize;

use uuid::Uuid;

use crate::error::CloneError;
use crate::hydration::{set_hydration, DEFAULT_THRESHOLD, MAX_BATCH_SIZE, MAX_MBYTES_PER_SEC};
use crate::lifecycle::{create, delete};
use crate::status::{status, status_all};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GetBdevsParams {
    #[serde(default)]
    pub name: Option<String>,
}

/// Register `bdev_clone_create`, `_delete`, `_get_bdevs`, `_set_hydration`.
pub fn register_rpcs() {
    const DECODE: DecodeError = DecodeError::InvalidParams;
    register_typed(
        "bdev_clone_create",
        RUNTIME,
        DECODE,
        |p: CreateOpts| async move { Ok(create(p).await?.name().to_string()) },
    );
    register_action("bdev_clone_delete", DECODE, |p: NameParams| async move {
        delete(&p.name).await
    });
    register_typed(
        "bdev_clone_get_bdevs",
        RUNTIME,
        DECODE,
        |p: GetBdevsParams| async move {
            match p.name {
                Some(n) => Ok(vec![status(&n).ok_or(CloneError::NoSuchClone(n))?]),
                None => Ok(status_all()),
            }
        },
    );
    register_action(
        "bdev_clone_set_hydration",
        DECODE,
        |p: HydrationOpts| async move { set_hydration(&p) },
    );
}

pub(crate) fn default_region_size_kb() -> u32 {
    4
}

/// Not given: no cap, the adaptive window decides (docs/clone.md,
/// *Tunables*). A value given, or in a saved config, is a cap.
pub(crate) fn default_threshold() -> u32 {
    DEFAULT_THRESHOLD
}

pub(crate) fn default_batch() -> u32 {
    MAX_BATCH_SIZE
}

/// Parameters of `bdev_clone_create` (defaults per rpc-contract §2.7).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOpts {
    pub name: String,
    pub source_bdev_name: String,
    pub dest_bdev_name: String,
    pub metadata_bdev_name: String,
    #[serde(default = "default_region_size_kb")]
    pub region_size_kb: u32,
    #[serde(default)]
    pub no_hydration: bool,
    #[serde(default)]
    pub no_discard_passdown: bool,
    #[serde(default = "default_threshold")]
    pub hydration_threshold: u32,
    #[serde(default = "default_batch")]
    pub hydration_batch_size: u32,
    #[serde(default)]
    pub hydration_mbytes_per_sec: u64,
    #[serde(default)]
    pub copy_on_read: bool,
    #[serde(default)]
    pub uuid: Option<Uuid>,
    /// Format the metadata whatever it holds (the operator's way out of
    /// damaged metadata). Never written by `save_config`.
    #[serde(default)]
    pub force_format: bool,
}

impl CreateOpts {
    pub fn new(
        name: impl Into<String>,
        source: impl Into<String>,
        dest: impl Into<String>,
        metadata: impl Into<String>,
    ) -> Self {
        CreateOpts {
            name: name.into(),
            source_bdev_name: source.into(),
            dest_bdev_name: dest.into(),
            metadata_bdev_name: metadata.into(),
            region_size_kb: default_region_size_kb(),
            no_hydration: false,
            no_discard_passdown: false,
            hydration_threshold: default_threshold(),
            hydration_batch_size: default_batch(),
            hydration_mbytes_per_sec: 0,
            copy_on_read: false,
            uuid: None,
            force_format: false,
        }
    }
}

/// Refuse tunables outside their ranges (-22, naming the range); the
/// threshold takes any u32 (the in-flight caps above bound its effect).
pub(crate) fn check_tunables(
    batch: Option<u32>,
    mbytes_per_sec: Option<u64>,
) -> Result<(), CloneError> {
    if let Some(b) = batch.filter(|b| !(1..=MAX_BATCH_SIZE).contains(b)) {
        return Err(CloneError::Invalid(format!(
            "hydration_batch_size {b} is out of range: 1 to {MAX_BATCH_SIZE} regions"
        )));
    }
    if let Some(m) = mbytes_per_sec.filter(|&m| m > MAX_MBYTES_PER_SEC) {
        return Err(CloneError::Invalid(format!(
            "hydration_mbytes_per_sec {m} is out of range: 0 (unlimited) to {MAX_MBYTES_PER_SEC}"
        )));
    }
    Ok(())
}

/// Runtime changes of `bdev_clone_set_hydration`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HydrationOpts {
    pub name: String,
    pub enable: Option<bool>,
    pub hydration_threshold: Option<u32>,
    pub hydration_batch_size: Option<u32>,
    pub hydration_mbytes_per_sec: Option<u64>,
}
