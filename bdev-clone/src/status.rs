//! What a clone reports: [`CloneStatus`], the status object of
//! `bdev_clone_get_bdevs` (rpc-contract §2.7), serialized by the target and
//! parsed by `clonectl` (which tolerates fields it does not know, so a newer
//! target may add some); the settings it shares with `save_config`
//! (`write_config_json`); and the lookups tests and tools use.

use std::sync::atomic::{AtomicU64, Ordering};

use reactor::sync::lock;
use serde::{Deserialize, Serialize};

use crate::clone::{clone_of, find, PaceStats, Shared};
use crate::hydration::{PAUSE_DEST, PAUSE_SOURCE};
use crate::metadata;
use crate::router::MetadataMode;

/// The settings `bdev_clone_create` takes: the status object's first
/// fields and `save_config`'s params (one serializer, as SPDK's delay
/// module).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CloneSettings {
    pub name: String,
    #[serde(default)]
    pub uuid: String,
    #[serde(default)]
    pub source_bdev_name: String,
    #[serde(default)]
    pub dest_bdev_name: String,
    #[serde(default)]
    pub metadata_bdev_name: String,
    #[serde(default)]
    pub region_size_kb: u64,
    #[serde(default)]
    pub hydration_threshold: u32,
    #[serde(default)]
    pub hydration_batch_size: u32,
    #[serde(default)]
    pub hydration_mbytes_per_sec: u64,
    #[serde(default)]
    pub copy_on_read: bool,
}

/// The status object of rpc-contract §2.7. Field order is the wire order.
/// `name`, `state`, `num_regions` and `hydrated_regions` are required when
/// parsing; the rest default (zero, false, none, metadata `rw`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CloneStatus {
    #[serde(flatten)]
    pub settings: CloneSettings,
    pub num_regions: u64,
    pub hydrated_regions: u64,
    #[serde(default)]
    pub hydrating_regions: u64,
    #[serde(default)]
    pub hydration_enabled: bool,
    #[serde(default)]
    pub discard_passdown: bool,
    pub state: CloneState,
    /// Set when `state` is `paused`.
    #[serde(default)]
    pub paused_reason: Option<PausedReason>,
    #[serde(default)]
    pub progress: Progress,
    /// Hydrated, committed, and the source's claim dropped.
    #[serde(default)]
    pub source_released: bool,
    #[serde(default)]
    pub errors: ErrorCounts,
    #[serde(default)]
    pub metadata: MetadataStatus,
    /// What the hydrator uses and measured.
    #[serde(default)]
    pub hydration: HydrationStatus,
    /// What went wrong last, when the target knows.
    #[serde(default)]
    pub last_error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "&'static str", try_from = "String")]
pub enum CloneState {
    Hydrating,
    /// By the user (disabled, threshold 0) or by base errors.
    Paused,
    Hydrated,
    /// Metadata read-only after a failed commit (dm-clone).
    ReadOnly,
    /// Metadata unusable: every I/O fails.
    Failed,
}

/// Why hydration is paused: `user` (disabled or threshold 0), or errors
/// of a base, which hydration leaves by itself once the base works.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "&'static str", try_from = "String")]
pub enum PausedReason {
    User,
    SourceErrors,
    DestErrors,
}

/// A status value with a fixed wire name: one table per type serves
/// serialization, parsing and display.
pub trait Named: Copy + 'static {
    const ALL: &'static [Self];
    fn name(self) -> &'static str;

    fn parse(name: &str) -> Result<Self, String> {
        Self::ALL
            .iter()
            .copied()
            .find(|v| v.name() == name)
            .ok_or_else(|| format!("unknown value {name:?}"))
    }
}

/// `metadata.mode` on the wire is [`MetadataMode::short_name`].
impl Named for MetadataMode {
    const ALL: &'static [Self] = &[Self::ReadWrite, Self::ReadOnly, Self::Failed];
    fn name(self) -> &'static str {
        self.short_name()
    }
}

/// A [`Named`] enum from its table of variants and wire names, with
/// serde's `into` / `try_from` conversions.
macro_rules! named {
    ($t:ty { $($v:ident => $n:literal),* $(,)? }) => {
        impl Named for $t {
            const ALL: &'static [Self] = &[$(Self::$v),*];
            fn name(self) -> &'static str {
                match self {
                    $(Self::$v => $n),*
                }
            }
        }

        impl From<$t> for &'static str {
            fn from(v: $t) -> Self {
                v.name()
            }
        }

        impl TryFrom<String> for $t {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                <$t>::parse(&s)
            }
        }
    };
}

named!(CloneState {
    Hydrating => "hydrating",
    Paused => "paused",
    Hydrated => "hydrated",
    ReadOnly => "read_only",
    Failed => "failed",
});

named!(PausedReason {
    User => "user",
    SourceErrors => "source_errors",
    DestErrors => "dest_errors",
});

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Hydrated regions in percent, rounded down to 0.01.
    pub percent: f64,
    /// Hydration rate over the last commit period.
    pub bytes_per_sec: u64,
    /// Seconds to full hydration at that rate; none while it is 0.
    pub eta_sec: Option<u64>,
}

/// The hydrator's window and its measurements, over the clone's owners:
/// bytes in flight on the source (hydration's; the user's cold reads'; the
/// most hydration had, per owner, summed), the window, the source's lowest
/// latency and its delivery rate (the owners share one link: latency the
/// lowest, rate the sum).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HydrationStatus {
    pub in_flight_bytes: u64,
    pub user_in_flight_bytes: u64,
    pub peak_in_flight_bytes: u64,
    pub window_bytes: u64,
    /// None before the first measurement.
    pub source_latency_us: Option<f64>,
    pub source_mbytes_per_sec: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCounts {
    pub source_read: u64,
    pub dest_write: u64,
    pub metadata: u64,
}

impl ErrorCounts {
    pub fn total(&self) -> u64 {
        self.source_read + self.dest_write + self.metadata
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataStatus {
    #[serde(default)]
    pub block_size: u32,
    #[serde(default)]
    pub used_blocks: u64,
    #[serde(default)]
    pub total_blocks: u64,
    #[serde(with = "short_mode", default = "read_write")]
    pub mode: MetadataMode,
}

impl Default for MetadataStatus {
    fn default() -> Self {
        MetadataStatus {
            block_size: 0,
            used_blocks: 0,
            total_blocks: 0,
            mode: MetadataMode::ReadWrite,
        }
    }
}

fn read_write() -> MetadataMode {
    MetadataMode::ReadWrite
}

/// `metadata.mode` (the router's type keeps its own serde names).
mod short_mode {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    use super::Named;
    use crate::router::MetadataMode;

    pub fn serialize<S: Serializer>(m: &MetadataMode, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(m.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<MetadataMode, D::Error> {
        MetadataMode::parse(&String::deserialize(d)?).map_err(D::Error::custom)
    }
}

/// `bdev_clone_create`'s params as `save_config` writes them.
#[derive(Serialize)]
pub(crate) struct ConfigParams {
    #[serde(flatten)]
    settings: CloneSettings,
    no_hydration: bool,
    no_discard_passdown: bool,
}

impl Shared {
    pub(crate) fn state(&self) -> CloneState {
        match self.mode() {
            MetadataMode::Failed => CloneState::Failed,
            MetadataMode::ReadOnly => CloneState::ReadOnly,
            _ if self.map.is_complete() => CloneState::Hydrated,
            _ if self.paused_reason().is_some() => CloneState::Paused,
            _ => CloneState::Hydrating,
        }
    }

    /// Why hydration is paused, when it is: `user` (disabled or threshold
    /// 0) before the errors, which hydration leaves by itself.
    pub(crate) fn paused_reason(&self) -> Option<PausedReason> {
        if !self.hydration_enabled.load(Ordering::Relaxed)
            || self.threshold.load(Ordering::Relaxed) == 0
        {
            return Some(PausedReason::User);
        }
        match self.paused.load(Ordering::Relaxed) {
            PAUSE_SOURCE => Some(PausedReason::SourceErrors),
            PAUSE_DEST => Some(PausedReason::DestErrors),
            _ => None,
        }
    }

    pub(crate) fn settings(&self) -> CloneSettings {
        CloneSettings {
            name: self.name.clone(),
            uuid: self.uuid.to_string(),
            source_bdev_name: self.source_name.clone(),
            dest_bdev_name: self.dest_name.clone(),
            metadata_bdev_name: self.md_name.clone(),
            region_size_kb: self.geo.region_size() / 1024,
            hydration_threshold: self.threshold.load(Ordering::Relaxed),
            hydration_batch_size: self.batch.load(Ordering::Relaxed),
            hydration_mbytes_per_sec: self.mbytes_per_sec.load(Ordering::Relaxed),
            copy_on_read: self.copy_on_read.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn config_params(&self) -> ConfigParams {
        ConfigParams {
            settings: self.settings(),
            no_hydration: !self.hydration_enabled.load(Ordering::Relaxed),
            no_discard_passdown: !self.discard_passdown,
        }
    }

    /// [`HydrationStatus`] from the owners' published figures.
    pub(crate) fn pacing_status(&self) -> HydrationStatus {
        let sum = |f: fn(&PaceStats) -> &AtomicU64| -> u64 {
            self.pacing
                .iter()
                .map(|p| f(p).load(Ordering::Relaxed))
                .sum()
        };
        let lat = self
            .pacing
            .iter()
            .map(|p| p.min_latency_ns.load(Ordering::Relaxed))
            .filter(|&l| l > 0)
            .min();
        let rate = sum(|p| &p.rate_bps) as f64 / 1048576.0;
        HydrationStatus {
            in_flight_bytes: sum(|p| &p.in_flight),
            user_in_flight_bytes: sum(|p| &p.user_in_flight),
            peak_in_flight_bytes: sum(|p| &p.peak_in_flight),
            window_bytes: sum(|p| &p.window),
            source_latency_us: lat.map(|l| (l as f64 / 100.0).round() / 10.0),
            source_mbytes_per_sec: (rate * 10.0).round() / 10.0,
        }
    }

    pub(crate) fn status(&self) -> CloneStatus {
        let num = self.geo.num_regions();
        let hydrated = self.map.hydrated_count();
        let rate = self.rate_bps.load(Ordering::Relaxed);
        let remaining_bytes = (num - hydrated).saturating_mul(self.geo.region_size());
        let percent = if num == 0 {
            100.0
        } else {
            (hydrated as f64 * 10000.0 / num as f64).floor() / 100.0
        };
        let eta_sec = match (remaining_bytes, rate) {
            (0, _) => Some(0),
            (_, 0) => None,
            (r, rate) => Some(r.div_ceil(rate)),
        };
        let state = self.state();
        CloneStatus {
            settings: self.settings(),
            num_regions: num,
            hydrated_regions: hydrated,
            hydrating_regions: self
                .hydrating
                .iter()
                .map(|h| h.load(Ordering::Relaxed))
                .sum(),
            hydration_enabled: self.hydration_enabled.load(Ordering::Relaxed),
            discard_passdown: self.discard_passdown,
            state,
            paused_reason: (state == CloneState::Paused)
                .then(|| self.paused_reason())
                .flatten(),
            progress: Progress {
                percent,
                bytes_per_sec: rate,
                eta_sec,
            },
            source_released: self.released.load(Ordering::Acquire),
            errors: ErrorCounts {
                source_read: self.err_source.load(Ordering::Relaxed),
                dest_write: self.err_dest.load(Ordering::Relaxed),
                metadata: self.err_md.load(Ordering::Relaxed),
            },
            metadata: MetadataStatus {
                block_size: self.md_block_size,
                used_blocks: metadata::required_bytes(num).div_ceil(self.md_block_size as u64),
                total_blocks: self.md_num_blocks,
                mode: self.mode(),
            },
            hydration: self.pacing_status(),
            last_error: lock(&self.last_error).clone(),
        }
    }
}

/// The status object of clone `name`.
pub fn status(name: &str) -> Option<CloneStatus> {
    find(name).map(|s| s.status())
}

/// Status of every clone, in registration order.
pub fn status_all() -> Vec<CloneStatus> {
    bdev::list()
        .iter()
        .filter_map(clone_of)
        .map(|s| s.status())
        .collect()
}

/// Test and tool access: the clone's shared map (to check hydration).
pub fn hydrated_regions(name: &str) -> Option<(u64, u64)> {
    find(name).map(|s| (s.map.hydrated_count(), s.geo.num_regions()))
}

/// Whether region `r` of clone `name` is hydrated (tests, tools).
pub fn region_hydrated(name: &str, r: u64) -> Option<bool> {
    find(name)
        .filter(|s| r < s.geo.num_regions())
        .map(|s| s.map.is_hydrated(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CloneStatus {
        CloneStatus {
            settings: CloneSettings {
                name: "C".into(),
                uuid: "11111111-2222-3333-4444-555555555555".into(),
                source_bdev_name: "S".into(),
                dest_bdev_name: "D".into(),
                metadata_bdev_name: "M".into(),
                region_size_kb: 64,
                hydration_threshold: 0,
                hydration_batch_size: 1,
                hydration_mbytes_per_sec: 0,
                copy_on_read: false,
            },
            num_regions: 16,
            hydrated_regions: 0,
            hydrating_regions: 0,
            hydration_enabled: true,
            discard_passdown: true,
            state: CloneState::Paused,
            paused_reason: Some(PausedReason::User),
            progress: Progress {
                percent: 0.0,
                bytes_per_sec: 0,
                eta_sec: None,
            },
            source_released: false,
            errors: ErrorCounts::default(),
            metadata: MetadataStatus {
                block_size: 512,
                used_blocks: 24,
                total_blocks: 256,
                mode: MetadataMode::ReadWrite,
            },
            hydration: HydrationStatus {
                in_flight_bytes: 131072,
                user_in_flight_bytes: 4096,
                peak_in_flight_bytes: 262144,
                window_bytes: 393216,
                source_latency_us: Some(2000.5),
                source_mbytes_per_sec: 100.2,
            },
            last_error: None,
        }
    }

    /// rpc-contract §2.7's object, field for field and in its order (rpc.py
    /// users, the tests and `clonectl --json` read it).
    #[test]
    fn the_status_object_on_the_wire() {
        let text = serde_json::to_string(&sample()).unwrap();
        assert_eq!(
            text,
            r#"{"name":"C","uuid":"11111111-2222-3333-4444-555555555555","source_bdev_name":"S","dest_bdev_name":"D","metadata_bdev_name":"M","region_size_kb":64,"hydration_threshold":0,"hydration_batch_size":1,"hydration_mbytes_per_sec":0,"copy_on_read":false,"num_regions":16,"hydrated_regions":0,"hydrating_regions":0,"hydration_enabled":true,"discard_passdown":true,"state":"paused","paused_reason":"user","progress":{"percent":0.0,"bytes_per_sec":0,"eta_sec":null},"source_released":false,"errors":{"source_read":0,"dest_write":0,"metadata":0},"metadata":{"block_size":512,"used_blocks":24,"total_blocks":256,"mode":"rw"},"hydration":{"in_flight_bytes":131072,"user_in_flight_bytes":4096,"peak_in_flight_bytes":262144,"window_bytes":393216,"source_latency_us":2000.5,"source_mbytes_per_sec":100.2},"last_error":null}"#
        );
        assert_eq!(
            serde_json::from_str::<CloneStatus>(&text).unwrap(),
            sample()
        );
    }

    #[test]
    fn every_named_value_parses_back_and_others_are_refused() {
        for s in CloneState::ALL {
            assert_eq!(CloneState::parse(s.name()), Ok(*s));
        }
        for r in PausedReason::ALL {
            assert_eq!(PausedReason::parse(r.name()), Ok(*r));
        }
        for m in MetadataMode::ALL {
            assert_eq!(MetadataMode::parse(m.name()), Ok(*m));
        }
        let mut v = serde_json::to_value(sample()).unwrap();
        v["metadata"]["mode"] = "read_write".into();
        let e = serde_json::from_value::<CloneStatus>(v).unwrap_err();
        assert!(e.to_string().contains("\"read_write\""), "{e}");
    }
}
