//! The target's management plane: transport options, subsystems,
//! namespaces, hosts, listeners and controllers.
//!
//! This state changes only through RPCs (on reactor 0), Connect and
//! controller teardown, so it sits behind mutexes. The I/O path never takes
//! these locks per command: a queue caches the namespace table and rebuilds
//! the cache only when the subsystem's generation counter moves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, OnceLock};

use serde_json::{json, Value};
use uuid::Uuid;

use crate::spec::{aen, DISCOVERY_NQN};

pub(crate) use reactor::sync::lock;

/// What the target asks of its transport, as SPDK's
/// `spdk_nvmf_transport_ops`: the target owns subsystems and controllers,
/// the transport owns the queues (connections) and their reactors. The
/// transport registers itself ([`set_transport_ops`]) before its first
/// queue exists; with none registered there is no queue to act on.
pub trait TransportOps: Sync {
    /// Close queue `conn`; called on the reactor that owns it.
    fn close_qpair(&self, conn: u64, why: &str);
    /// Admin queue `conn` has asynchronous events queued on its controller:
    /// complete pending AERs with them; called on the queue's reactor.
    fn deliver_events(&self, conn: u64);
}

/// A listening endpoint of the transport (kept in [`Tgt::listeners`]).
pub trait Listener: Send {
    /// Stop accepting and close the endpoint.
    fn stop(&self);
}

static TRANSPORT_OPS: OnceLock<&'static dyn TransportOps> = OnceLock::new();

/// Register the transport (idempotent; the first one stays).
pub fn set_transport_ops(ops: &'static dyn TransportOps) {
    let _ = TRANSPORT_OPS.set(ops);
}

fn on_transport(f: impl FnOnce(&'static dyn TransportOps)) {
    if let Some(ops) = TRANSPORT_OPS.get() {
        f(*ops);
    }
}

/// TCP transport options (`nvmf_create_transport`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportOpts {
    pub max_queue_depth: u16,
    pub max_io_qpairs_per_ctrlr: u16,
    pub in_capsule_data_size: u32,
    pub max_io_size: u32,
    pub io_unit_size: u32,
    pub max_aq_depth: u32,
    pub c2h_success: bool,
    pub sock_priority: u32,
    pub abort_timeout_sec: u32,
    pub zcopy: bool,
    pub dif_insert_or_strip: bool,
    pub ack_timeout: u32,
    pub data_wr_pool_size: u32,
    pub disable_command_passthru: bool,
    pub kas: u16,
    pub min_kato: u32,
}

impl Default for TransportOpts {
    fn default() -> Self {
        TransportOpts {
            max_queue_depth: 128,
            max_io_qpairs_per_ctrlr: 127,
            in_capsule_data_size: 4096,
            max_io_size: 131072,
            io_unit_size: 131072,
            max_aq_depth: 128,
            c2h_success: true,
            sock_priority: 0,
            abort_timeout_sec: 1,
            zcopy: false,
            dif_insert_or_strip: false,
            ack_timeout: 0,
            data_wr_pool_size: 0,
            disable_command_passthru: false,
            kas: 10,
            min_kato: 10000,
        }
    }
}

/// Largest payload of one H2CData PDU we accept (ICResp MAXH2CDATA).
pub const MAX_H2C_DATA: u32 = 131072;
/// In-capsule data always accepted on the admin queue (hosts put up to
/// 8 KiB there whatever IOCCSZ says).
pub const ADMIN_ICD: u32 = 8192;
/// Number of outstanding AERs a controller keeps (AERL + 1).
pub const AER_LIMIT: usize = 4;
/// Idle timeout of a discovery controller connected with KATO 0.
pub const DISCOVERY_IDLE_MS: u32 = 120_000;

impl TransportOpts {
    /// MDTS in 4 KiB units, as a power of two.
    pub fn mdts(&self) -> u8 {
        let pages = (self.max_io_size / 4096).max(1);
        (31 - pages.leading_zeros()) as u8
    }
    /// Largest transfer of one command, in bytes.
    pub fn max_xfer(&self) -> u32 {
        4096u32 << self.mdts()
    }
    pub fn ioccsz(&self) -> u32 {
        (64 + self.in_capsule_data_size) / 16
    }
    pub fn to_json(&self) -> Value {
        json!({
            "trtype": "TCP",
            "max_queue_depth": self.max_queue_depth,
            "max_io_qpairs_per_ctrlr": self.max_io_qpairs_per_ctrlr,
            "in_capsule_data_size": self.in_capsule_data_size,
            "max_io_size": self.max_io_size,
            "io_unit_size": self.io_unit_size,
            "max_aq_depth": self.max_aq_depth,
            "num_shared_buffers": 511,
            "buf_cache_size": 4294967295u32,
            "dif_insert_or_strip": self.dif_insert_or_strip,
            "zcopy": self.zcopy,
            "c2h_success": self.c2h_success,
            "sock_priority": self.sock_priority,
            "abort_timeout_sec": self.abort_timeout_sec,
            "ack_timeout": self.ack_timeout,
            "data_wr_pool_size": self.data_wr_pool_size,
            "disable_command_passthru": self.disable_command_passthru,
            "kas": self.kas,
            "min_kato": self.min_kato,
        })
    }
}

/// A listen address as the RPCs carry it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ListenAddr {
    pub adrfam: Adrfam,
    pub traddr: String,
    pub trsvcid: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Adrfam {
    Ipv4,
    Ipv6,
}

impl Adrfam {
    pub fn name(self) -> &'static str {
        match self {
            Adrfam::Ipv4 => "IPv4",
            Adrfam::Ipv6 => "IPv6",
        }
    }
}

impl ListenAddr {
    pub fn to_json(&self) -> Value {
        json!({
            "trtype": "TCP",
            "adrfam": self.adrfam.name(),
            "traddr": self.traddr,
            "trsvcid": self.trsvcid,
        })
    }
    pub fn port(&self) -> u16 {
        self.trsvcid.parse().unwrap_or(0)
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.traddr, self.trsvcid)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubType {
    Nvme,
    Discovery,
}

/// One namespace: an open bdev descriptor plus its identifiers.
pub struct Namespace {
    pub nsid: u32,
    pub bdev_name: String,
    pub bdev: Arc<bdev::Bdev>,
    /// Dropped (closing the bdev) when the namespace is removed; queues
    /// hold `Arc<Namespace>` in their caches but never the descriptor.
    pub desc: Mutex<Option<bdev::Desc>>,
    pub removed: AtomicBool,
    pub uuid: Uuid,
    pub nguid: [u8; 16],
    /// Whether `nguid` was given by the user (dumped in the config then).
    pub nguid_set: bool,
    pub eui64: Option<[u8; 8]>,
    pub uuid_set: bool,
    pub block_size: u32,
    pub read_only: bool,
}

impl Namespace {
    pub fn num_blocks(&self) -> u64 {
        self.bdev.num_blocks()
    }
    /// A channel on the calling reactor, unless the namespace is gone.
    pub fn channel(&self) -> Option<bdev::IoChannel> {
        lock(&self.desc).as_ref().map(|d| d.channel())
    }
    pub fn to_json(&self, dump: bool) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("nsid".into(), json!(self.nsid));
        m.insert("bdev_name".into(), json!(self.bdev_name));
        if dump {
            m.insert("name".into(), json!(self.bdev_name));
        }
        if dump || self.nguid_set {
            m.insert("nguid".into(), json!(hex_upper(&self.nguid)));
        }
        if let Some(e) = self.eui64 {
            m.insert("eui64".into(), json!(hex_upper(&e)));
        }
        m.insert("uuid".into(), json!(self.uuid.to_string()));
        Value::Object(m)
    }
}

pub fn hex_upper(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// Parse a hex identifier (NGUID 32 digits, EUI64 16), dashes allowed.
pub fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digits: Vec<u8> = s.bytes().filter(|&c| c != b'-').collect();
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in digits.chunks(2).enumerate() {
        let h = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(h, 16).ok()?;
    }
    Some(out)
}

/// Mutable part of a subsystem.
pub struct SubState {
    pub allow_any_host: bool,
    pub hosts: Vec<String>,
    pub listeners: Vec<ListenAddr>,
    /// Index nsid - 1.
    pub ns: Vec<Option<Arc<Namespace>>>,
    pub ctrls: Vec<Arc<Ctrl>>,
    pub next_cntlid: u16,
}

pub struct Subsystem {
    pub nqn: String,
    pub subtype: SubType,
    pub serial_number: String,
    pub model_number: String,
    pub max_namespaces: u32,
    /// Whether `max_namespaces` was given (dumped only then, as SPDK).
    pub max_namespaces_set: bool,
    pub min_cntlid: u16,
    pub max_cntlid: u16,
    pub ana_reporting: bool,
    pub state: Mutex<SubState>,
    /// Bumped on every namespace change; queues compare it per command.
    pub ns_gen: AtomicU64,
}

impl Subsystem {
    /// An empty subsystem: `max_namespaces` free namespace slots, no hosts,
    /// listeners or controllers, controller IDs from `cntlid.0` to
    /// `cntlid.1`. Serial and model numbers are empty and ANA reporting off;
    /// callers set what they need with struct update syntax.
    pub fn new(
        nqn: String,
        subtype: SubType,
        max_namespaces: u32,
        cntlid: (u16, u16),
        allow_any_host: bool,
    ) -> Subsystem {
        Subsystem {
            nqn,
            subtype,
            serial_number: String::new(),
            model_number: String::new(),
            max_namespaces,
            max_namespaces_set: false,
            min_cntlid: cntlid.0,
            max_cntlid: cntlid.1,
            ana_reporting: false,
            state: Mutex::new(SubState {
                allow_any_host,
                hosts: Vec::new(),
                listeners: Vec::new(),
                ns: vec![None; max_namespaces as usize],
                ctrls: Vec::new(),
                next_cntlid: cntlid.0,
            }),
            ns_gen: AtomicU64::new(0),
        }
    }

    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        if self.subtype == SubType::Discovery {
            return true;
        }
        let st = lock(&self.state);
        st.allow_any_host || st.hosts.iter().any(|h| h == hostnqn)
    }
    pub fn namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        if nsid == 0 {
            return None;
        }
        lock(&self.state)
            .ns
            .get(nsid as usize - 1)
            .cloned()
            .flatten()
    }
    /// Active NSIDs, ascending.
    pub fn active_nsids(&self) -> Vec<u32> {
        lock(&self.state)
            .ns
            .iter()
            .flatten()
            .map(|n| n.nsid)
            .collect()
    }
    pub fn listens_on(&self, a: &ListenAddr) -> bool {
        lock(&self.state)
            .listeners
            .iter()
            .any(|l| l.trsvcid == a.trsvcid && l.traddr == a.traddr)
    }
}

/// Host-visible controller state, changed by admin commands (admin path
/// only; the I/O path reads the atomics).
#[derive(Default)]
pub struct CtrlState {
    pub cc: u32,
    pub csts: u32,
    /// Granted I/O queues (Set Features 07h), 0 until set.
    pub num_io_queues: u32,
    /// Connected I/O queues: qid → (reactor, connection id).
    pub io_qpairs: HashMap<u16, (u32, u64)>,
    pub aec: u32,
    /// Events waiting for an AER.
    pub events: Vec<u32>,
    /// Event DW0 values posted and not yet cleared by reading their log.
    pub masked: Vec<u32>,
    pub changed_ns: Vec<u32>,
    pub feat: HashMap<u8, u32>,
}

pub struct Ctrl {
    pub cntlid: u16,
    pub subsys: Arc<Subsystem>,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub kato_ms: AtomicU32,
    pub admin_reactor: u32,
    pub admin_conn: u64,
    /// CC.EN = 1 and CSTS.RDY = 1: I/O allowed.
    pub ready: AtomicBool,
    pub last_ka_ns: AtomicU64,
    pub listen: ListenAddr,
    pub state: Mutex<CtrlState>,
    pub destroyed: AtomicBool,
}

impl Ctrl {
    pub fn is_discovery(&self) -> bool {
        self.subsys.subtype == SubType::Discovery
    }

    /// Queue an asynchronous event and wake the admin queue to deliver it.
    pub fn raise_event(self: &Arc<Self>, dw0: u32, cfg_bit: u32) {
        {
            let mut st = lock(&self.state);
            if st.aec & cfg_bit == 0 || st.masked.contains(&dw0) || st.events.contains(&dw0) {
                return;
            }
            st.events.push(dw0);
        }
        let conn = self.admin_conn;
        reactor::send(self.admin_reactor, move || {
            on_transport(|t| t.deliver_events(conn))
        });
    }

    pub fn json(&self) -> Value {
        let st = lock(&self.state);
        json!({
            "cntlid": self.cntlid,
            "cntrltype": if self.is_discovery() { "discovery" } else { "io" },
            "hostnqn": self.hostnqn,
            "hostid": Uuid::from_bytes(self.hostid).to_string(),
            "num_io_qpairs": st.io_qpairs.len(),
        })
    }
}

/// Per-reactor statistics (`nvmf_get_stats`); one cache line pair each so
/// reactors never write to a line another reactor writes.
#[derive(Default)]
#[repr(align(128))]
pub struct PollGroupStats {
    pub admin_qpairs: AtomicU64,
    pub io_qpairs: AtomicU64,
    pub current_admin_qpairs: AtomicU64,
    pub current_io_qpairs: AtomicU64,
    pub current_unassociated_qpairs: AtomicU64,
    pub pending_bdev_io: AtomicU64,
    pub completed_nvme_io: AtomicU64,
}

pub struct Tgt {
    pub transport: Option<TransportOpts>,
    pub subsystems: Vec<Arc<Subsystem>>,
    pub discovery_genctr: u64,
    /// Listening sockets by address, with the number of subsystems using
    /// each.
    pub listeners: HashMap<ListenAddr, (Box<dyn Listener>, u32)>,
    pub next_port_id: u16,
    pub port_ids: HashMap<ListenAddr, u16>,
    pub qpair_rr: u32,
}

pub static TGT: LazyLock<Mutex<Tgt>> = LazyLock::new(|| {
    Mutex::new(Tgt {
        transport: None,
        subsystems: vec![Arc::new(new_discovery_subsystem())],
        discovery_genctr: 0,
        listeners: HashMap::new(),
        next_port_id: 0,
        port_ids: HashMap::new(),
        qpair_rr: 0,
    })
});

pub static STATS: LazyLock<Vec<PollGroupStats>> = LazyLock::new(|| {
    (0..reactor::num_reactors().max(1))
        .map(|_| PollGroupStats::default())
        .collect()
});

pub fn stats(reactor: u32) -> &'static PollGroupStats {
    let s = &*STATS;
    &s[(reactor as usize).min(s.len() - 1)]
}

fn new_discovery_subsystem() -> Subsystem {
    Subsystem::new(
        DISCOVERY_NQN.to_string(),
        SubType::Discovery,
        0,
        (1, 0xFFEF),
        true,
    )
}

pub fn tgt() -> MutexGuard<'static, Tgt> {
    lock(&TGT)
}

pub fn find_subsystem(nqn: &str) -> Option<Arc<Subsystem>> {
    tgt().subsystems.iter().find(|s| s.nqn == nqn).cloned()
}

pub fn transport() -> Option<TransportOpts> {
    tgt().transport.clone()
}

/// Record a discovery-visible change: bump GENCTR and tell discovery
/// controllers that asked for the event.
pub fn discovery_changed() {
    let ctrls: Vec<Arc<Ctrl>> = {
        let mut t = tgt();
        t.discovery_genctr += 1;
        let d = t
            .subsystems
            .iter()
            .find(|s| s.subtype == SubType::Discovery)
            .cloned();
        d.map(|d| lock(&d.state).ctrls.clone()).unwrap_or_default()
    };
    for c in ctrls {
        c.raise_event(aen::DISCOVERY_CHANGED, aen::CFG_DISCOVERY);
    }
}

/// Tell every controller of `subsys` that namespace `nsid` changed.
pub fn namespace_changed(subsys: &Arc<Subsystem>, nsid: u32) {
    subsys.ns_gen.fetch_add(1, Ordering::AcqRel);
    let ctrls = lock(&subsys.state).ctrls.clone();
    for c in ctrls {
        {
            let mut st = lock(&c.state);
            if !st.changed_ns.contains(&nsid) {
                if st.changed_ns.len() >= 1024 {
                    // Overflow: the log then reports 0xFFFFFFFF.
                    st.changed_ns = vec![0xFFFF_FFFF];
                } else if st.changed_ns.first() != Some(&0xFFFF_FFFF) {
                    st.changed_ns.push(nsid);
                }
            }
        }
        c.raise_event(aen::NS_CHANGED, aen::CFG_NS_ATTR);
    }
}

/// Allocate a controller ID in the subsystem's range (unique among live
/// controllers of the subsystem).
pub fn alloc_cntlid(s: &Subsystem, st: &mut SubState) -> Option<u16> {
    let span = (s.max_cntlid - s.min_cntlid) as u32 + 1;
    for _ in 0..span {
        let c = st.next_cntlid.clamp(s.min_cntlid, s.max_cntlid);
        st.next_cntlid = if c >= s.max_cntlid {
            s.min_cntlid
        } else {
            c + 1
        };
        if !st.ctrls.iter().any(|x| x.cntlid == c) {
            return Some(c);
        }
    }
    None
}

/// Remove a controller from its subsystem and close its queues. Idempotent.
pub fn destroy_ctrl(c: &Arc<Ctrl>) {
    if c.destroyed.swap(true, Ordering::AcqRel) {
        return;
    }
    c.ready.store(false, Ordering::Release);
    lock(&c.subsys.state).ctrls.retain(|x| !Arc::ptr_eq(x, c));
    let qps: Vec<(u32, u64)> = lock(&c.state).io_qpairs.drain().map(|(_, v)| v).collect();
    for (r, id) in qps {
        reactor::send(r, move || {
            on_transport(|t| t.close_qpair(id, "controller destroyed"))
        });
    }
    let (r, id) = (c.admin_reactor, c.admin_conn);
    reactor::send(r, move || {
        on_transport(|t| t.close_qpair(id, "controller destroyed"))
    });
    tracing::info!(nqn = %c.subsys.nqn, cntlid = c.cntlid, host = %c.hostnqn, "controller destroyed");
}

/// Close the I/O queues of a controller (CC.EN 1→0, shutdown).
pub fn close_io_queues(c: &Arc<Ctrl>) {
    let qps: Vec<(u32, u64)> = lock(&c.state).io_qpairs.drain().map(|(_, v)| v).collect();
    for (r, id) in qps {
        reactor::send(r, move || {
            on_transport(|t| t.close_qpair(id, "controller reset or shutdown"))
        });
    }
}
