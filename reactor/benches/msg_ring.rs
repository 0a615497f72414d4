//! Message ring throughput between two reactors: reactor 1 sends N
//! messages to reactor 0 through its lock-free mailbox; the time until
//! reactor 0 has run all N is measured. Busy-polling mode, as in production.
//! Run: `cargo bench -p reactor --bench msg_ring`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn bench(c: &mut Criterion) {
    let two_cores = std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
    let cfg = reactor::Config {
        core_mask: if two_cores { 0x3 } else { 0x1 },
        interrupt_mode: false,
        mem_size_mb: 8,
        no_huge: true,
        uring_entries: 64,
    };
    let rt = reactor::start(cfg, || {}).expect("start reactors");
    let from = if two_cores { 1 } else { 0 };

    let mut g = c.benchmark_group("msg_ring");
    const BATCH: u64 = 100_000;
    g.throughput(Throughput::Elements(BATCH));
    g.measurement_time(Duration::from_secs(5));
    g.bench_function(format!("reactor{from}_to_reactor0"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (tx, rx) = mpsc::channel();
                let state = Arc::new((AtomicU64::new(0), std::sync::Mutex::new(Some(tx))));
                let t0 = Instant::now();
                reactor::send(from, move || {
                    for _ in 0..BATCH {
                        let s = state.clone();
                        reactor::send(0, move || {
                            // Only reactor 0 increments: no contention here.
                            if s.0.fetch_add(1, Ordering::Relaxed) + 1 == BATCH {
                                if let Some(tx) = s.1.lock().unwrap().take() {
                                    let _ = tx.send(());
                                }
                            }
                        });
                    }
                });
                rx.recv().expect("reactor 0 ran the batch");
                total += t0.elapsed();
            }
            total
        })
    });
    g.finish();
    reactor::stop();
    rt.join();
}

criterion_group!(benches, bench);
criterion_main!(benches);
