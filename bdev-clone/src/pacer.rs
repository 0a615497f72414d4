//! How much hydration keeps in flight on the source: a controller in the
//! manner of TCP BBR, pure (time is an argument), one per owner.
//!
//! It measures the source as every read of it completes, hydration's chunks
//! and the user's cold reads alike (they share the link): the delivery rate
//! (bytes completed per interval of at least [`RATE_INTERVAL_NS`] and one
//! latency, the windowed maximum of the last [`BW_SAMPLES`] intervals:
//! shorter samples mostly measure how completions bunch up when the reactor
//! is descheduled) and the lowest latency (the windowed minimum over
//! [`MIN_RTT_WINDOW_NS`]). Their product is the
//! bandwidth-delay product: what the link holds when it is full and its
//! queue empty. The window is that times a gain that depends on the phase:
//!
//! * `Startup`: gain 2.89, so the window about triples each round until the
//!   rate stops growing by 25 % for 3 intervals (the link is full); then
//! * `Drain`: gain 1 until what is in flight fits the product; then
//! * `ProbeBw`: rounds of [`HEADROOM`] (the link stays full through noise
//!   and one chunk of granularity), one phase in eight at 1.25 × that (so a
//!   faster link is found) followed by one at gain 1 (the queue that probe
//!   made drains); a phase lasts a rate interval. A round whose lowest
//!   latency is over twice the minimum means a queue built up (another user
//!   of the link, or the link slowed down): a phase at gain 1 follows.
//! * `ProbeRtt`: when the minimum latency was not seen again for
//!   [`MIN_RTT_WINDOW_NS`], a round (at least [`PROBE_RTT_NS`]) at gain 0.75
//!   measures it afresh, as the link's real latency may have changed.
//!
//! A round ends when a read sent after the previous round's end completes
//! (about one latency). The window is at least [`MIN_WINDOW_CHUNKS`] chunks
//! and at most the cap (the tunables and the owner's buffer cap). The
//! user's reads are never held back: hydration gets what the window has
//! left after them ([`Pacer::room`]).

/// Startup's gain: 2 / ln 2, BBR's (the window doubles per round even when
/// the rate measured lags).
pub const STARTUP_GAIN: f64 = 2.89;

/// Gain of the cruising rounds: in flight is this much above the
/// bandwidth-delay product, so the link stays full through estimation noise
/// while its queue holds at most half a latency's worth.
pub const HEADROOM: f64 = 1.5;

/// One round in [`CYCLE`] probes for more bandwidth at this × HEADROOM.
pub const PROBE_GAIN: f64 = 1.25;

/// The rounds of `ProbeBw`: probe, drain (gain 1), then cruise.
const CYCLE: [f64; 8] = [
    HEADROOM * PROBE_GAIN,
    1.0,
    HEADROOM,
    HEADROOM,
    HEADROOM,
    HEADROOM,
    HEADROOM,
    HEADROOM,
];
const CYCLE_DRAIN: usize = 1;
const CYCLE_CRUISE: usize = 2;

/// Intervals over which the delivery rate's maximum is kept.
pub const BW_SAMPLES: usize = 10;

/// Shortest interval of a delivery rate sample (also at least the
/// minimum latency).
pub const RATE_INTERVAL_NS: u64 = 10_000_000;

/// How long the minimum latency holds before `ProbeRtt` measures it again.
pub const MIN_RTT_WINDOW_NS: u64 = 10_000_000_000;

/// Shortest `ProbeRtt`.
pub const PROBE_RTT_NS: u64 = 200_000_000;

const PROBE_RTT_GAIN: f64 = 0.75;

/// The window always allows this much queueing at the measured rate: a
/// device that serves reads in parallel (a local disk, a striped remote)
/// delivers more with more in flight at little more latency, which the
/// single-queue model of the gains cannot see; a link that is one queue
/// makes a user's read wait at most this much more.
pub const QUEUE_NS: u64 = 1_000_000;

/// A round whose lowest latency exceeds the minimum by this factor drains.
pub const DRAIN_LATENCY_FACTOR: f64 = 2.0;

/// Smallest window, in chunks; and the window before any measurement.
pub const MIN_WINDOW_CHUNKS: u64 = 2;
pub const INITIAL_WINDOW_CHUNKS: u64 = 4;

/// Rate samples of less than 25 % growth after which Startup ends.
const FULL_BW_SAMPLES: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Startup,
    Drain,
    ProbeBw,
    ProbeRtt,
}

/// What [`Pacer::on_send`] recorded about a read; give it back to
/// [`Pacer::on_done`] or [`Pacer::on_failed`].
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    bytes: u64,
    user: bool,
    sent_ns: u64,
    delivered: u64,
    delivered_ns: u64,
}

/// The controller. Time is in nanoseconds, from any monotonic origin.
#[derive(Clone, Debug)]
pub struct Pacer {
    chunk: u64,
    cap: u64,
    hyd_in_flight: u64,
    user_in_flight: u64,
    /// Bytes completed since creation, and when the last one did.
    delivered: u64,
    delivered_ns: u64,
    /// In flight reached the window during the interval under way.
    filled: bool,
    /// The latest time seen, and the user's latest read of the source.
    now: u64,
    user_seen_ns: Option<u64>,
    /// The rate interval under way: its start and `delivered` then.
    ival_ns: u64,
    ival_delivered: u64,
    /// The last intervals' delivery rates (bytes/s), by sample % BW_SAMPLES.
    bw_ring: [u64; BW_SAMPLES],
    samples: u64,
    bw: u64,
    min_rtt_ns: u64,
    min_rtt_stamp: u64,
    round: u64,
    next_round_delivered: u64,
    round_min_lat: u64,
    phase: Phase,
    phase_stamp: u64,
    cycle: usize,
    cycle_stamp: u64,
    full_bw: u64,
    full_bw_samples: u32,
    probe_rtt_min: u64,
    window: u64,
}

impl Pacer {
    /// A controller for reads of about `chunk` bytes, at most `cap` in
    /// flight for hydration.
    pub fn new(chunk: u64, cap: u64, now: u64) -> Pacer {
        let chunk = chunk.max(1);
        let mut p = Pacer {
            chunk,
            cap: cap.max(chunk),
            hyd_in_flight: 0,
            user_in_flight: 0,
            delivered: 0,
            delivered_ns: now,
            filled: false,
            now,
            user_seen_ns: None,
            ival_ns: now,
            ival_delivered: 0,
            bw_ring: [0; BW_SAMPLES],
            samples: 0,
            bw: 0,
            min_rtt_ns: u64::MAX,
            min_rtt_stamp: now,
            round: 0,
            next_round_delivered: 0,
            round_min_lat: u64::MAX,
            phase: Phase::Startup,
            phase_stamp: now,
            cycle: CYCLE_CRUISE,
            cycle_stamp: now,
            full_bw: 0,
            full_bw_samples: 0,
            probe_rtt_min: u64::MAX,
            window: 0,
        };
        p.update_window();
        p
    }

    /// The most hydration may keep in flight (the tunables' and the
    /// buffers' caps); never below one chunk.
    pub fn set_cap(&mut self, cap: u64) {
        self.cap = cap.max(self.chunk);
        self.update_window();
    }

    /// Bytes hydration may start reading now: the window less what is in
    /// flight, the user's reads first. With nothing in flight at all, at
    /// least one chunk.
    pub fn room(&self) -> u64 {
        let used = self.hyd_in_flight + self.user_in_flight;
        if used == 0 {
            return self.window.max(self.chunk);
        }
        self.window.saturating_sub(used)
    }

    /// A read of the source starts: `user` for a user's cold read.
    pub fn on_send(&mut self, now: u64, bytes: u64, user: bool) -> Sent {
        if self.hyd_in_flight + self.user_in_flight == 0 {
            // Idle until now: the rate interval starts with this send.
            self.ival_ns = now;
            self.ival_delivered = self.delivered;
            self.delivered_ns = now;
        }
        self.now = self.now.max(now);
        if user {
            self.user_in_flight += bytes;
            self.user_seen_ns = Some(now);
        } else {
            self.hyd_in_flight += bytes;
        }
        if self.hyd_in_flight + self.user_in_flight + self.chunk > self.window {
            self.filled = true;
        }
        Sent {
            bytes,
            user,
            sent_ns: now,
            delivered: self.delivered,
            delivered_ns: self.delivered_ns,
        }
    }

    fn release(&mut self, s: &Sent) {
        if s.user {
            self.user_in_flight = self.user_in_flight.saturating_sub(s.bytes);
        } else {
            self.hyd_in_flight = self.hyd_in_flight.saturating_sub(s.bytes);
        }
    }

    /// A read failed: it leaves the flight, and measures nothing.
    pub fn on_failed(&mut self, s: Sent) {
        self.release(&s);
        self.update_window();
    }

    /// A read completed at `now`.
    pub fn on_done(&mut self, now: u64, s: Sent) {
        self.now = self.now.max(now);
        self.release(&s);
        self.delivered += s.bytes;
        // Completions seen at the send's own clock tick still took time.
        let lat = now.saturating_sub(s.sent_ns).max(1_000);
        self.round_min_lat = self.round_min_lat.min(lat);
        if lat <= self.min_rtt_ns {
            self.min_rtt_ns = lat;
            self.min_rtt_stamp = now;
        } else if self.phase != Phase::ProbeRtt
            && now.saturating_sub(self.min_rtt_stamp) > MIN_RTT_WINDOW_NS
        {
            // The minimum was not seen again for a while: measure it
            // afresh, with the queue drained.
            self.enter(Phase::ProbeRtt, now);
            self.probe_rtt_min = lat;
        }
        if self.phase == Phase::ProbeRtt {
            self.probe_rtt_min = self.probe_rtt_min.min(lat);
        }
        if self.phase == Phase::Startup {
            // While the window grows by rounds, each read measures what
            // was delivered over its own life (as BBR): interval samples
            // would lag a round behind.
            let life = now.saturating_sub(s.delivered_ns).max(lat);
            let rate =
                ((self.delivered - s.delivered) as u128 * 1_000_000_000 / life as u128) as u64;
            let slot = (self.samples % BW_SAMPLES as u64) as usize;
            self.bw_ring[slot] = self.bw_ring[slot].max(rate);
            self.bw = self.bw.max(rate);
        }
        self.delivered_ns = now;
        let span = now.saturating_sub(self.ival_ns);
        if span >= RATE_INTERVAL_NS.max(self.min_rtt_ns) {
            self.rate_sample(now, span);
        }
        if s.delivered >= self.next_round_delivered {
            self.next_round_delivered = self.delivered;
            self.end_round(now);
        }
        if self.phase == Phase::Drain && self.hyd_in_flight + self.user_in_flight <= self.window {
            self.enter(Phase::ProbeBw, now);
            self.cycle = CYCLE_CRUISE;
            self.cycle_stamp = now;
        }
        self.update_window();
    }

    fn enter(&mut self, phase: Phase, now: u64) {
        self.phase = phase;
        self.phase_stamp = now;
    }

    /// The interval under way ends: its delivery rate joins the window.
    fn rate_sample(&mut self, now: u64, span: u64) {
        let rate =
            ((self.delivered - self.ival_delivered) as u128 * 1_000_000_000 / span as u128) as u64;
        self.ival_ns = now;
        self.ival_delivered = self.delivered;
        let slot = (self.samples % BW_SAMPLES as u64) as usize;
        self.bw_ring[slot] = self.bw_ring[slot].max(rate);
        self.samples += 1;
        self.bw = self.bw_ring.iter().copied().max().unwrap_or(0);
        self.bw_ring[(self.samples % BW_SAMPLES as u64) as usize] = 0;
        let filled = std::mem::take(&mut self.filled);
        // The rate stopped growing while the window was full: the link is.
        if self.phase == Phase::Startup && filled {
            if self.bw as f64 >= self.full_bw as f64 * 1.25 {
                self.full_bw = self.bw;
                self.full_bw_samples = 0;
            } else {
                self.full_bw_samples += 1;
                if self.full_bw_samples >= FULL_BW_SAMPLES {
                    self.enter(Phase::Drain, now);
                }
            }
        }
    }

    fn end_round(&mut self, now: u64) {
        let round_min = std::mem::replace(&mut self.round_min_lat, u64::MAX);
        self.round += 1;
        match self.phase {
            Phase::Startup | Phase::Drain => {}
            Phase::ProbeBw => {
                let queued = self.min_rtt_ns != u64::MAX
                    && round_min as f64 > self.min_rtt_ns as f64 * DRAIN_LATENCY_FACTOR;
                // A phase lasts at least one rate interval, so that its
                // rate sample shows what its gain did.
                let due =
                    now.saturating_sub(self.cycle_stamp) >= RATE_INTERVAL_NS.max(self.min_rtt_ns);
                if queued && self.cycle != CYCLE_DRAIN {
                    self.cycle = CYCLE_DRAIN;
                    self.cycle_stamp = now;
                } else if due {
                    self.cycle = (self.cycle + 1) % CYCLE.len();
                    self.cycle_stamp = now;
                }
            }
            Phase::ProbeRtt => {
                if now.saturating_sub(self.phase_stamp) >= PROBE_RTT_NS {
                    self.min_rtt_ns = self.probe_rtt_min;
                    self.min_rtt_stamp = now;
                    self.probe_rtt_min = u64::MAX;
                    self.enter(Phase::ProbeBw, now);
                    self.cycle = CYCLE_CRUISE;
                    self.cycle_stamp = now;
                }
            }
        }
    }

    fn gain(&self) -> f64 {
        match self.phase {
            Phase::Startup => STARTUP_GAIN,
            Phase::Drain => 1.0,
            // While the user reads the source, cruise with no headroom
            // beyond the queue floor: each chunk of headroom is a chunk the
            // user's next cold read waits behind.
            Phase::ProbeBw if self.user_recent() => CYCLE[self.cycle] / HEADROOM,
            Phase::ProbeBw => CYCLE[self.cycle],
            Phase::ProbeRtt => PROBE_RTT_GAIN,
        }
    }

    /// The user read the source within the last two rate intervals.
    fn user_recent(&self) -> bool {
        self.user_in_flight > 0
            || self.user_seen_ns.is_some_and(|t| {
                self.now.saturating_sub(t) < 2 * RATE_INTERVAL_NS.max(self.min_rtt_ns)
            })
    }

    /// Bandwidth-delay product (bytes), 0 before the first measurement.
    pub fn bdp(&self) -> u64 {
        if self.min_rtt_ns == u64::MAX {
            return 0;
        }
        (self.bw as u128 * self.min_rtt_ns as u128 / 1_000_000_000) as u64
    }

    fn update_window(&mut self) {
        let w = if self.bw == 0 || self.min_rtt_ns == u64::MAX {
            INITIAL_WINDOW_CHUNKS * self.chunk
        } else {
            let queue = (self.bw as u128 * QUEUE_NS as u128 / 1_000_000_000) as u64;
            let floor = if self.phase == Phase::ProbeRtt {
                0
            } else {
                self.bdp() + queue
            };
            ((self.bdp() as f64 * self.gain()) as u64).max(floor)
        };
        // Whole chunks: a window a little short of one more chunk would
        // leave that chunk's share of the link idle.
        let w = w.div_ceil(self.chunk).saturating_mul(self.chunk);
        self.window = w.max(MIN_WINDOW_CHUNKS * self.chunk).min(self.cap);
    }

    pub fn window(&self) -> u64 {
        self.window
    }

    pub fn hyd_in_flight(&self) -> u64 {
        self.hyd_in_flight
    }

    pub fn user_in_flight(&self) -> u64 {
        self.user_in_flight
    }

    /// Windowed maximum delivery rate, bytes/s (0 before a measurement).
    pub fn bw(&self) -> u64 {
        self.bw
    }

    /// Windowed minimum latency, ns (`None` before a measurement).
    pub fn min_rtt(&self) -> Option<u64> {
        (self.min_rtt_ns != u64::MAX).then_some(self.min_rtt_ns)
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }
}

/// A token bucket in bytes: the hydration rate ceiling.
#[derive(Clone, Debug, Default)]
pub struct TokenBucket {
    tokens: f64,
    last_ns: u64,
}

impl TokenBucket {
    /// Refill at `bps` bytes/s up to a burst of 50 ms' worth (at least
    /// `min_burst`): whether anything may start now. `bps == 0` is no limit.
    pub fn refill(&mut self, now: u64, bps: f64, min_burst: f64) -> bool {
        let elapsed = now.saturating_sub(self.last_ns) as f64 / 1e9;
        self.last_ns = now;
        if bps <= 0.0 {
            self.tokens = 0.0;
            return true;
        }
        // An idle spell does not let hydration overshoot afterwards.
        let cap = (bps * 0.05).max(min_burst);
        self.tokens = (self.tokens + elapsed * bps).min(cap);
        self.tokens > 0.0
    }

    /// Bytes started; the bucket may go negative (one copy's worth).
    pub fn take(&mut self, bytes: f64) {
        self.tokens -= bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    const KIB: u64 = 1024;
    const MIB: u64 = 1 << 20;
    const MS: u64 = 1_000_000;
    const CHUNK: u64 = 64 * KIB;

    /// A link as the benchmark builds it: a rate limit (FIFO) in
    /// front of a fixed latency, plus an optional extra queueing delay
    /// (someone else's traffic).
    struct Link {
        bps: u64,
        delay_ns: u64,
        free_at: u64,
        extra_ns: u64,
    }

    impl Link {
        fn new(bps: u64, delay_ns: u64) -> Link {
            Link {
                bps,
                delay_ns,
                free_at: 0,
                extra_ns: 0,
            }
        }
        fn submit(&mut self, now: u64, bytes: u64) -> u64 {
            let start = self.free_at.max(now);
            self.free_at = start + bytes * 1_000_000_000 / self.bps;
            self.free_at + self.delay_ns + self.extra_ns
        }
    }

    #[derive(Default)]
    struct Run {
        hyd_bytes: u64,
        user_bytes: u64,
        user_lat_sum: u64,
        user_reads: u64,
        user_lat_max: u64,
        max_total_in_flight_over_window: bool,
        drained: bool,
    }

    /// The pacer, the link, and what is in flight on it.
    struct Sim {
        p: Pacer,
        link: Link,
        now: u64,
        heap: BinaryHeap<Reverse<(u64, u64)>>,
        sent: std::collections::HashMap<u64, Sent>,
        id: u64,
        user_out: u32,
    }

    impl Sim {
        fn new(cap: u64, bps: u64, delay_ns: u64) -> Sim {
            Sim {
                p: Pacer::new(CHUNK, cap, 0),
                link: Link::new(bps, delay_ns),
                now: 0,
                heap: BinaryHeap::new(),
                sent: Default::default(),
                id: 0,
                user_out: 0,
            }
        }

        fn send(&mut self, bytes: u64, user: bool) {
            let s = self.p.on_send(self.now, bytes, user);
            self.id += 1;
            self.sent.insert(self.id, s);
            let done = self.link.submit(self.now, bytes);
            self.heap.push(Reverse((done, self.id)));
        }

        /// Hydration sends chunks whenever the pacer has room; a user
        /// keeps `user_qd` reads of `user_bytes` in flight. Runs `ns` of
        /// simulated time; `at(now, link)` may change the link.
        fn run(
            &mut self,
            ns: u64,
            user_qd: u32,
            user_bytes: u64,
            mut at: impl FnMut(u64, &mut Link),
        ) -> Run {
            let mut r = Run::default();
            let end = self.now + ns;
            loop {
                at(self.now, &mut self.link);
                while self.user_out < user_qd {
                    self.send(user_bytes, true);
                    self.user_out += 1;
                }
                while self.p.room() >= CHUNK {
                    self.send(CHUNK, false);
                    if self.p.hyd_in_flight() > CHUNK
                        && self.p.hyd_in_flight() + self.p.user_in_flight()
                            > self.p.window() + user_bytes
                    {
                        r.max_total_in_flight_over_window = true;
                    }
                }
                let Reverse((t, i)) = *self.heap.peek().expect("something in flight");
                if t > end {
                    self.now = end;
                    return r;
                }
                self.heap.pop();
                self.now = t;
                let s = self.sent.remove(&i).unwrap();
                self.p.on_done(t, s);
                if self.p.phase() == Phase::ProbeBw && self.p.window() <= self.p.bdp() + CHUNK {
                    r.drained = true;
                }
                if s.user {
                    self.user_out -= 1;
                    r.user_bytes += s.bytes;
                    let lat = t - s.sent_ns;
                    r.user_lat_sum += lat;
                    r.user_reads += 1;
                    r.user_lat_max = r.user_lat_max.max(lat);
                } else {
                    r.hyd_bytes += s.bytes;
                }
            }
        }
    }

    fn share(bytes: u64, bps: u64, ns: u64) -> f64 {
        bytes as f64 / (bps as f64 * ns as f64 / 1e9)
    }

    #[test]
    fn fills_links_from_local_to_wan_with_a_short_queue() {
        for (bps, delay) in [
            (2000 * MIB, MS / 10),
            (100 * MIB, 2 * MS),
            (100 * MIB, 10 * MS),
            (100 * MIB, 50 * MS),
            (1000 * MIB, 50 * MS),
        ] {
            let mut sim = Sim::new(1 << 40, bps, delay);
            // Converge (Startup at 50 ms takes about 10 rounds), then measure.
            sim.run(2_000 * MS + 40 * delay, 0, 0, |_, _| {});
            let ns = 3_000 * MS;
            let r = sim.run(ns, 0, 0, |_, _| {});
            let p = &sim.p;
            let bdp = bps * delay / 1_000_000_000;
            let what = format!(
                "{} MiB/s, {} us: window {} KiB, BDP {} KiB, measured bdp {} KiB, {:?}",
                bps / MIB,
                delay / 1000,
                p.window() / KIB,
                bdp / KIB,
                p.bdp() / KIB,
                p.phase()
            );
            eprintln!("{what}, share {:.4}", share(r.hyd_bytes, bps, ns));
            assert_eq!(p.phase(), Phase::ProbeBw, "{what}");
            let s = share(r.hyd_bytes, bps, ns);
            assert!(s >= 0.97, "link share {s:.3}: {what}");
            // About BDP x headroom: the measured latency includes one
            // chunk's transfer, hence the chunk of slack.
            assert!(p.window() >= bdp, "{what}");
            assert!(
                p.window() as f64 <= (bdp + CHUNK) as f64 * HEADROOM * PROBE_GAIN * 1.1
                    || p.window() <= MIN_WINDOW_CHUNKS * CHUNK
                    || p.window() <= bdp + 2 * CHUNK + bps * QUEUE_NS / 1_000_000_000 * 11 / 10,
                "{what}"
            );
            let rtt = p.min_rtt().unwrap();
            assert!(
                rtt >= delay && rtt <= delay + 2 * CHUNK * 1_000_000_000 / bps,
                "{what}: rtt {rtt}"
            );
        }
    }

    #[test]
    fn finds_a_faster_link() {
        let mut sim = Sim::new(1 << 40, 50 * MIB, 10 * MS);
        sim.run(3_000 * MS, 0, 0, |_, _| {});
        let before = sim.p.bdp();
        sim.link.bps = 200 * MIB;
        sim.run(3_000 * MS, 0, 0, |_, _| {});
        let ns = 2_000 * MS;
        let r = sim.run(ns, 0, 0, |_, _| {});
        let after = sim.p.bdp();
        // 4x the rate, a little less latency (a chunk's transfer).
        assert!(after as f64 >= before as f64 * 3.5, "{before} -> {after}");
        assert!(share(r.hyd_bytes, 200 * MIB, ns) >= 0.97);
    }

    #[test]
    fn drains_when_latency_rises_above_the_minimum() {
        let mut sim = Sim::new(1 << 40, 100 * MIB, 2 * MS);
        sim.run(2_000 * MS, 0, 0, |_, _| {});
        // Someone else's queue in front of ours: every read 5 ms later.
        let r = sim.run(500 * MS, 0, 0, |_, l| l.extra_ns = 5 * MS);
        assert!(
            r.drained,
            "no round at gain 1 while latency was 3.5x the minimum"
        );
        // The queue goes away: back to cruising with the link full.
        let ns = 2_000 * MS;
        let r = sim.run(ns, 0, 0, |_, l| l.extra_ns = 0);
        assert!(share(r.hyd_bytes, 100 * MIB, ns) >= 0.97);
    }

    #[test]
    fn remeasures_the_minimum_latency_when_the_link_gets_slower() {
        let mut sim = Sim::new(1 << 40, 100 * MIB, 2 * MS);
        sim.run(2_000 * MS, 0, 0, |_, _| {});
        // The route changes: 10 ms from now on. The old minimum expires,
        // ProbeRtt measures the new one and the window grows to fill it.
        sim.link.delay_ns = 10 * MS;
        sim.run(15_000 * MS, 0, 0, |_, _| {});
        assert!(sim.p.min_rtt().unwrap() >= 10 * MS, "{:?}", sim.p.min_rtt());
        let ns = 2_000 * MS;
        let r = sim.run(ns, 0, 0, |_, _| {});
        assert!(share(r.hyd_bytes, 100 * MIB, ns) >= 0.95);
    }

    #[test]
    fn the_user_goes_first_and_the_link_stays_full() {
        for delay in [2 * MS, 10 * MS] {
            let bps = 100 * MIB;
            let mut sim = Sim::new(1 << 40, bps, delay);
            sim.run(2_000 * MS, 0, 0, |_, _| {});
            let ns = 3_000 * MS;
            // A host reading 4 KiB at QD32, all cold.
            let r = sim.run(ns, 32, 4 * KIB, |_, _| {});
            assert!(
                !r.max_total_in_flight_over_window,
                "hydration went past the user's share"
            );
            let busy = share(r.hyd_bytes + r.user_bytes, bps, ns);
            assert!(busy >= 0.95, "link busy {busy:.3}");
            // The user's reads queue behind at most the window's headroom.
            let avg = r.user_lat_sum / r.user_reads;
            // Behind the user: the probe's quarter of a latency now and
            // then, the queue floor, a chunk of granularity.
            let bound = delay + delay / 4 + QUEUE_NS + 2 * CHUNK * 1_000_000_000 / bps;
            eprintln!("{} ms link with a QD32 4 KiB reader: busy {busy:.3}, user latency avg {} us max {} us", delay / MS, avg / 1000, r.user_lat_max / 1000);
            assert!(avg <= bound, "user latency {avg} ns > {bound} ns");
            assert!(r.hyd_bytes > 0);
        }
    }

    #[test]
    fn a_user_filling_the_window_holds_hydration_back() {
        let mut p = Pacer::new(CHUNK, 1 << 40, 0);
        let s: Vec<Sent> = (0..4).map(|_| p.on_send(0, CHUNK, true)).collect();
        assert!(p.user_in_flight() >= p.window());
        assert_eq!(p.room(), 0);
        for x in s {
            p.on_done(2 * MS, x);
        }
        assert_eq!(p.room(), p.window());
    }

    #[test]
    fn caps_bound_the_window() {
        let mut sim = Sim::new(3 * CHUNK, 100 * MIB, 10 * MS);
        sim.run(2_000 * MS, 0, 0, |_, _| {});
        assert_eq!(sim.p.window(), 3 * CHUNK);
        sim.p.set_cap(0);
        assert_eq!(sim.p.window(), CHUNK, "never below one chunk");
        // The cap lifted: the window grows to fill the link.
        sim.p.set_cap(1 << 40);
        sim.run(2_000 * MS, 0, 0, |_, _| {});
        let ns = 1_000 * MS;
        let r = sim.run(ns, 0, 0, |_, _| {});
        assert!(sim.p.window() > 3 * CHUNK);
        assert!(share(r.hyd_bytes, 100 * MIB, ns) >= 0.97);
    }

    #[test]
    fn failed_reads_leave_the_flight_and_measure_nothing() {
        let mut p = Pacer::new(CHUNK, 1 << 40, 0);
        let s = p.on_send(0, CHUNK, false);
        p.on_failed(s);
        assert_eq!((p.hyd_in_flight(), p.bw(), p.min_rtt()), (0, 0, None));
        assert_eq!(p.window(), INITIAL_WINDOW_CHUNKS * CHUNK);
    }

    #[test]
    fn token_bucket_holds_the_rate_ceiling() {
        let mut b = TokenBucket::default();
        let bps = 8.0 * MIB as f64;
        let mut started = 0.0;
        let mut now = 0;
        // A copy of 256 KiB whenever the bucket allows, polled every 2 ms.
        while now < 10_000 * MS {
            while b.refill(now, bps, 256.0 * 1024.0) {
                b.take(256.0 * 1024.0);
                started += 256.0 * 1024.0;
            }
            now += 2 * MS;
        }
        let rate = started / 10.0;
        assert!((rate / bps - 1.0).abs() < 0.02, "{rate} vs {bps}");
        assert!(TokenBucket::default().refill(5, 0.0, 1.0), "0 is no limit");
    }
}
