//! The result table, column for column as SPDK's `bdevperf_test_done`.

use std::fmt::Write as _;
use std::io::Write as _;

use crate::job::JobResult;

pub struct Row<'a> {
    pub name: &'a str,
    pub core_mask: u64,
    pub workload: &'a str,
    pub read_pct: Option<u8>,
    pub queue_depth: u32,
    pub io_size: u64,
    pub verify_range: Option<(u64, u64)>,
    pub result: &'a JobResult,
}

/// Per-job figures in SPDK's units.
struct Stats {
    runtime_s: f64,
    iops: f64,
    mibps: f64,
    fail_ps: f64,
    avg_us: f64,
    min_us: f64,
    max_us: f64,
}

fn stats(row: &Row<'_>) -> Stats {
    let r = row.result;
    // Guard the division for a job that ended at once.
    let secs = (r.runtime_ns.max(1)) as f64 / 1e9;
    let iops = r.completed as f64 / secs;
    let total = r.completed + r.failed;
    Stats {
        runtime_s: r.runtime_ns as f64 / 1e9,
        iops,
        mibps: iops * row.io_size as f64 / (1024.0 * 1024.0),
        fail_ps: r.failed as f64 / secs,
        avg_us: if total == 0 {
            0.0
        } else {
            r.lat_sum_ns as f64 / total as f64 / 1e3
        },
        min_us: r.lat_min_ns as f64 / 1e3,
        max_us: r.lat_max_ns as f64 / 1e3,
    }
}

/// The whole table, from the "Latency(us)" heading to the Total line.
pub fn render(rows: &[Row<'_>]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n{:>107}", "Latency(us)");
    let _ = writeln!(
        out,
        " {:<28}: {:>10} {:>10} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10}",
        "Device Information",
        "runtime(s)",
        "IOPS",
        "MiB/s",
        "Fail/s",
        "TO/s",
        "Average",
        "min",
        "max"
    );
    let (mut iops, mut mibps, mut fail_ps) = (0.0, 0.0, 0.0);
    let (mut lat_sum, mut ios) = (0u128, 0u64);
    let (mut min_us, mut max_us) = (f64::MAX, 0.0f64);
    for row in rows {
        let s = stats(row);
        let r = row.result;
        let _ = writeln!(out, " Job: {} (Core Mask {:#x})", row.name, row.core_mask);
        match row.read_pct {
            Some(pct) => {
                let _ = writeln!(
                    out,
                    "\t workload: {}, percentage: {}, depth: {}, IO size: {}",
                    row.workload, pct, row.queue_depth, row.io_size
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "\t workload: {}, depth: {}, IO size: {}",
                    row.workload, row.queue_depth, row.io_size
                );
            }
        }
        if r.ended_with_error {
            let _ = writeln!(
                out,
                "\t {} ended in about {:.2} seconds with error",
                row.name, s.runtime_s
            );
        }
        if r.miscompares > 0 {
            let _ = writeln!(out, "\t {} verify miscompares", r.miscompares);
        }
        if let Some((start, len)) = row.verify_range {
            let _ = writeln!(
                out,
                "\t Verification LBA range: start {start:#x} length {len:#x}"
            );
        }
        let _ = writeln!(
            out,
            "\t {:<20}: {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>8.2} {:>10.2} {:>10.2} {:>10.2}",
            row.name, s.runtime_s, s.iops, s.mibps, s.fail_ps, 0.0, s.avg_us, s.min_us, s.max_us
        );
        iops += s.iops;
        mibps += s.mibps;
        fail_ps += s.fail_ps;
        lat_sum += u128::from(r.lat_sum_ns);
        ios += r.completed + r.failed;
        if r.completed + r.failed > 0 {
            min_us = min_us.min(s.min_us);
            max_us = max_us.max(s.max_us);
        }
    }
    let avg_us = if ios == 0 {
        0.0
    } else {
        lat_sum as f64 / ios as f64 / 1e3
    };
    if min_us == f64::MAX {
        min_us = 0.0;
    }
    let _ = writeln!(out, " {}", "=".repeat(115));
    let _ = writeln!(
        out,
        " {:<28}: {:>10} {:>10.2} {:>10.2} {:>10.2} {:>8.2} {:>10.2} {:>10.2} {:>10.2}",
        "Total", "", iops, mibps, fail_ps, 0.0, avg_us, min_us, max_us
    );
    out
}

pub fn flush() {
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(completed: u64, failed: u64) -> JobResult {
        JobResult {
            runtime_ns: 2_000_000_000,
            completed,
            failed,
            miscompares: 0,
            lat_sum_ns: (completed + failed) * 10_000,
            lat_min_ns: 5_000,
            lat_max_ns: 20_000,
            histogram: None,
            ended_with_error: failed > 0,
            desc: None,
        }
    }

    #[test]
    fn table_layout_and_totals() {
        let (a, b) = (result(200_000, 0), result(100_000, 2));
        let rows = [
            Row {
                name: "Malloc0",
                core_mask: 0x1,
                workload: "randread",
                read_pct: None,
                queue_depth: 32,
                io_size: 4096,
                verify_range: None,
                result: &a,
            },
            Row {
                name: "Malloc1",
                core_mask: 0x2,
                workload: "rw",
                read_pct: Some(70),
                queue_depth: 32,
                io_size: 4096,
                verify_range: Some((0, 0x40)),
                result: &b,
            },
        ];
        let t = render(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[1].len(), 107);
        assert!(lines[1].ends_with("Latency(us)"));
        assert_eq!(
            lines[2],
            " Device Information          : runtime(s)       IOPS      MiB/s     Fail/s     TO/s    Average        min        max"
        );
        assert_eq!(lines[3], " Job: Malloc0 (Core Mask 0x1)");
        assert_eq!(lines[4], "\t workload: randread, depth: 32, IO size: 4096");
        assert_eq!(
            lines[5],
            "\t Malloc0             :       2.00  100000.00     390.62       0.00     0.00      10.00       5.00      20.00"
        );
        assert_eq!(
            lines[7],
            "\t workload: rw, percentage: 70, depth: 32, IO size: 4096"
        );
        assert_eq!(
            lines[8],
            "\t Malloc1 ended in about 2.00 seconds with error"
        );
        assert_eq!(lines[9], "\t Verification LBA range: start 0x0 length 0x40");
        assert!(lines[10].contains("      1.00 "), "Fail/s: {}", lines[10]);
        assert_eq!(lines[11], format!(" {}", "=".repeat(115)));
        assert_eq!(
            lines[12],
            " Total                       :             150000.00     585.94       1.00     0.00      10.00       5.00      20.00"
        );
    }
}
