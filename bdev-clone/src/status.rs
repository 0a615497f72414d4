//! What a clone reports: the status object of `bdev_clone_get_bdevs`
//! (rpc-contract §2.7), the settings shared with `save_config`
//! (`write_config_json`), and the lookups tests and tools use.

use std::sync::atomic::{AtomicU64, Ordering};

use reactor::sync::lock;
use serde_json::{json, Value};

use crate::clone::{clone_of, find, PaceStats, Shared};
use crate::hydration::{PAUSE_DEST, PAUSE_SOURCE};
use crate::metadata;
use crate::router::MetadataMode;

impl Shared {
    pub(crate) fn state(&self) -> &'static str {
        match self.mode() {
            MetadataMode::Failed => "failed",
            MetadataMode::ReadOnly => "read_only",
            _ if self.map.is_complete() => "hydrated",
            _ if self.paused_reason().is_some() => "paused",
            _ => "hydrating",
        }
    }

    /// Why hydration is paused, when it is: `user` (disabled or threshold
    /// 0) before the errors, which hydration leaves by itself.
    pub(crate) fn paused_reason(&self) -> Option<&'static str> {
        if !self.hydration_enabled.load(Ordering::Relaxed)
            || self.threshold.load(Ordering::Relaxed) == 0
        {
            return Some("user");
        }
        match self.paused.load(Ordering::Relaxed) {
            PAUSE_SOURCE => Some("source_errors"),
            PAUSE_DEST => Some("dest_errors"),
            _ => None,
        }
    }

    /// The settings `bdev_clone_create` takes, shared by the status object
    /// and `write_config_json` (one serializer, as SPDK's delay module).
    pub(crate) fn settings(&self) -> serde_json::Map<String, Value> {
        let v = json!({
            "name": self.name,
            "uuid": self.uuid.to_string(),
            "source_bdev_name": self.source_name,
            "dest_bdev_name": self.dest_name,
            "metadata_bdev_name": self.md_name,
            "region_size_kb": self.geo.region_size() / 1024,
            "hydration_threshold": self.threshold.load(Ordering::Relaxed),
            "hydration_batch_size": self.batch.load(Ordering::Relaxed),
            "hydration_mbytes_per_sec": self.mbytes_per_sec.load(Ordering::Relaxed),
            "copy_on_read": self.copy_on_read.load(Ordering::Relaxed),
        });
        match v {
            Value::Object(m) => m,
            _ => unreachable!("json! of an object"),
        }
    }

    pub(crate) fn config_params(&self) -> Value {
        let mut m = self.settings();
        m.insert(
            "no_hydration".into(),
            json!(!self.hydration_enabled.load(Ordering::Relaxed)),
        );
        m.insert("no_discard_passdown".into(), json!(!self.discard_passdown));
        Value::Object(m)
    }

    /// What the hydrator uses and measured, over its owners: bytes in
    /// flight on the source (hydration's, the user's cold reads', the most
    /// hydration had), the window, the source's lowest latency and its
    /// delivery rate (the links of all owners are one: latency the lowest,
    /// rate the sum).
    pub(crate) fn pacing_status(&self) -> Value {
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
        json!({
            "in_flight_bytes": sum(|p| &p.in_flight),
            "user_in_flight_bytes": sum(|p| &p.user_in_flight),
            "peak_in_flight_bytes": sum(|p| &p.peak_in_flight),
            "window_bytes": sum(|p| &p.window),
            "source_latency_us": lat.map(|l| (l as f64 / 100.0).round() / 10.0),
            "source_mbytes_per_sec": (rate * 10.0).round() / 10.0,
        })
    }

    /// The status object of rpc-contract §2.7.
    pub(crate) fn status(&self) -> Value {
        let mut m = self.settings();
        let num = self.geo.num_regions();
        let hydrated = self.map.hydrated_count();
        let rate = self.rate_bps.load(Ordering::Relaxed);
        let remaining_bytes = (num - hydrated).saturating_mul(self.geo.region_size());
        let percent = if num == 0 {
            100.0
        } else {
            (hydrated as f64 * 10000.0 / num as f64).floor() / 100.0
        };
        let eta = if remaining_bytes == 0 {
            json!(0)
        } else if rate == 0 {
            Value::Null
        } else {
            json!(remaining_bytes.div_ceil(rate))
        };
        let mode = self.mode().short_name();
        let used = metadata::required_bytes(num).div_ceil(self.md_block_size as u64);
        m.insert("num_regions".into(), json!(num));
        m.insert("hydrated_regions".into(), json!(hydrated));
        m.insert(
            "hydrating_regions".into(),
            json!(self
                .hydrating
                .iter()
                .map(|h| h.load(Ordering::Relaxed))
                .sum::<u64>()),
        );
        m.insert(
            "hydration_enabled".into(),
            json!(self.hydration_enabled.load(Ordering::Relaxed)),
        );
        m.insert("discard_passdown".into(), json!(self.discard_passdown));
        let state = self.state();
        m.insert("state".into(), json!(state));
        m.insert(
            "paused_reason".into(),
            json!((state == "paused").then(|| self.paused_reason()).flatten()),
        );
        m.insert(
            "progress".into(),
            json!({"percent": percent, "bytes_per_sec": rate, "eta_sec": eta}),
        );
        m.insert(
            "source_released".into(),
            json!(self.released.load(Ordering::Acquire)),
        );
        m.insert(
            "errors".into(),
            json!({
                "source_read": self.err_source.load(Ordering::Relaxed),
                "dest_write": self.err_dest.load(Ordering::Relaxed),
                "metadata": self.err_md.load(Ordering::Relaxed),
            }),
        );
        m.insert(
            "metadata".into(),
            json!({
                "block_size": self.md_block_size,
                "used_blocks": used,
                "total_blocks": self.md_num_blocks,
                "mode": mode,
            }),
        );
        m.insert("hydration".into(), self.pacing_status());
        m.insert("last_error".into(), json!(lock(&self.last_error).clone()));
        Value::Object(m)
    }
}

/// The status object of clone `name`.
pub fn status(name: &str) -> Option<Value> {
    find(name).map(|s| s.status())
}

/// Status of every clone, in registration order.
pub fn status_all() -> Vec<Value> {
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
