//! Stable-toolchain stand-in for the cargo-fuzz targets: replay the
//! committed corpus (nbd/fuzz/corpus/<target>/) through the same entry
//! points, then a few seconds of random and mutated inputs.

use std::path::Path;
use std::time::{Duration, Instant};

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.expect("dir entry").path();
        out.push(std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())));
    }
    assert!(
        out.len() >= 5,
        "corpus {target} has only {} inputs",
        out.len()
    );
    out
}

/// xorshift64*: deterministic, seeded from the clock and printed so a
/// failure can be replayed with NBD_FUZZ_SEED.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn run(target: &str, f: fn(&[u8])) {
    let seeds = corpus(target);
    for s in &seeds {
        f(s);
    }
    let seed = std::env::var("NBD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            Instant::now().elapsed().as_nanos() as u64
                ^ 0x9E37_79B9_7F4A_7C15
                ^ std::process::id() as u64
        });
    eprintln!("{target}: NBD_FUZZ_SEED={seed}");
    let mut rng = Rng(seed | 1);
    let secs = std::env::var("NBD_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut n = 0u64;
    while Instant::now() < end {
        let mut input = if rng.next().is_multiple_of(4) {
            let len = (rng.next() % 600) as usize;
            (0..len).map(|_| rng.next() as u8).collect::<Vec<u8>>()
        } else {
            seeds[(rng.next() as usize) % seeds.len()].clone()
        };
        // Mutate: flip bytes, truncate, splice.
        for _ in 0..(rng.next() % 8) {
            if input.is_empty() {
                break;
            }
            let i = (rng.next() as usize) % input.len();
            match rng.next() % 4 {
                0 => input[i] ^= 1 << (rng.next() % 8),
                1 => input[i] = rng.next() as u8,
                2 => input.truncate(i),
                _ => {
                    let b = input[i..].to_vec();
                    input.extend_from_slice(&b[..b.len().min(64)]);
                }
            }
        }
        f(&input);
        n += 1;
    }
    eprintln!("{target}: {n} inputs");
}

#[test]
fn server_stream_corpus_and_random() {
    run("server_stream", nbd::fuzz::server_stream);
}

#[test]
fn client_stream_corpus_and_random() {
    run("client_stream", nbd::fuzz::client_stream);
}
