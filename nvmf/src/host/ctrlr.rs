//! A controller seen from the host: its admin queue (reactor 0), its I/O
//! queue pairs (one per reactor), keep-alive, reconnect and detach.
//!
//! Thread rules: a [`Ctrlr`] lives on reactor 0, where the RPCs run. Each
//! reactor has a [`Local`] per controller (its queue pair and the I/O
//! waiting for a reconnect); reactor 0 reaches them by message. The state
//! every reactor needs to decide an I/O's fate without asking reactor 0
//! (connected, queue while reconnecting, fail fast, failed) is one atomic in
//! [`Shared`].

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bdev::{BdevIo, IoStatus};
use reactor::{PollStatus, Poller};
use uuid::Uuid;

use super::qpair::{QpParams, Qpair};
use super::sock::resolve;
use super::HostError;
use crate::spec::{self, id_ctrl, id_ns, le16, le32, le64, Cqe, Sqe};
use reactor::with_timeout;

/// I/O state shared by every reactor (values of [`Shared::state`]).
pub const ST_CONNECTED: u8 = 0;
/// Reconnecting: I/O waits for the controller to come back.
pub const ST_QUEUE: u8 = 1;
/// Reconnecting past fast_io_fail_timeout_sec: I/O fails at once.
pub const ST_FAIL_FAST: u8 = 2;
/// Reconnect given up (or not configured): I/O fails.
pub const ST_FAILED: u8 = 3;
/// Detached.
pub const ST_DELETED: u8 = 4;

/// Admin queue entries (SQSIZE 31), as both real hosts use.
const ADMIN_DEPTH: u16 = 32;
/// I/O queue entries we ask for (clamped to CAP.MQES + 1).
const IO_DEPTH: u16 = 128;
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// SPDK's default keep-alive timeout.
pub const DEFAULT_KATO_MS: u32 = 10_000;

/// What `bdev_nvme_attach_controller` was given (TCP only).
#[derive(Clone, Debug)]
pub struct AttachOpts {
    pub name: String,
    pub traddr: String,
    pub trsvcid: String,
    /// "IPv4" or "IPv6", as SPDK prints it.
    pub adrfam: String,
    pub subnqn: String,
    pub hostnqn: String,
    pub hdgst: bool,
    pub ddgst: bool,
    pub num_io_queues: u32,
    pub ctrlr_loss_timeout_sec: i32,
    pub reconnect_delay_sec: u32,
    pub fast_io_fail_timeout_sec: u32,
    pub connect_timeout: Duration,
    pub kato_ms: u32,
}

/// Identify Controller fields the host uses.
#[derive(Clone, Debug, Default)]
pub struct CtrlrData {
    pub cntlid: u16,
    pub vid: u16,
    pub sn: String,
    pub mn: String,
    pub fr: String,
    pub subnqn: String,
    pub ver: u32,
    /// Largest transfer in bytes (u64::MAX when MDTS = 0).
    pub max_xfer: u64,
    pub ioccsz: u32,
    pub nn: u32,
    pub oncs: u16,
    pub vwc: u8,
    pub kas: u16,
    pub mqes: u16,
    pub cntrltype: u8,
}

impl CtrlrData {
    pub fn supports_dsm(&self) -> bool {
        self.oncs & (1 << 2) != 0
    }
    pub fn supports_write_zeroes(&self) -> bool {
        self.oncs & (1 << 3) != 0
    }
    pub fn volatile_write_cache(&self) -> bool {
        self.vwc & 1 != 0
    }
}

/// An active namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NsInfo {
    pub nsid: u32,
    pub block_size: u32,
    pub num_blocks: u64,
    pub uuid: Option<Uuid>,
    pub nguid: [u8; 16],
}

/// State every reactor reads.
pub struct Shared {
    pub id: u64,
    pub state: AtomicU8,
    /// Limits the data path needs, fixed at attach.
    pub data: Mutex<CtrlrData>,
}

impl Shared {
    pub fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }
}

// ---------------------------------------------------------------------------
// Per-reactor half

/// A controller's presence on one reactor: its queue pair and the I/O that
/// wait for a reconnect.
pub struct Local {
    shared: Arc<Shared>,
    qp: RefCell<Option<Rc<Qpair>>>,
    retry: RefCell<VecDeque<Waiting>>,
    /// The queue pair failed and reactor 0 has not switched the state yet.
    lost: Cell<bool>,
}

struct Waiting {
    io: Box<BdevIo>,
    nsid: u32,
    bs: u32,
}

thread_local! {
    static LOCALS: RefCell<HashMap<u64, Rc<Local>>> = RefCell::new(HashMap::new());
}

/// This reactor's [`Local`] for the controller (created on first use).
pub fn local(shared: &Arc<Shared>) -> Rc<Local> {
    LOCALS.with(|l| {
        l.borrow_mut()
            .entry(shared.id)
            .or_insert_with(|| {
                Rc::new(Local {
                    shared: shared.clone(),
                    qp: RefCell::new(None),
                    retry: RefCell::new(VecDeque::with_capacity(256)),
                    lost: Cell::new(false),
                })
            })
            .clone()
    })
}

fn local_if_any(id: u64) -> Option<Rc<Local>> {
    LOCALS.with(|l| l.borrow().get(&id).cloned())
}

impl Local {
    /// Submit a bdev I/O to this reactor's queue pair, or park / fail it
    /// when the controller is not connected (SPDK's bdev_nvme behaviour).
    pub fn submit(&self, io: Box<BdevIo>, nsid: u32, bs: u32) {
        let qp = self.qp.borrow().clone();
        let io = match qp {
            Some(qp) if self.shared.state() == ST_CONNECTED => match qp.submit_io(io, nsid, bs) {
                Ok(()) => return,
                Err(io) => io,
            },
            _ => io,
        };
        self.unavailable(io, nsid, bs);
    }

    fn unavailable(&self, io: Box<BdevIo>, nsid: u32, bs: u32) {
        match self.shared.state() {
            ST_QUEUE => self.retry.borrow_mut().push_back(Waiting { io, nsid, bs }),
            ST_CONNECTED if self.lost.get() => {
                self.retry.borrow_mut().push_back(Waiting { io, nsid, bs })
            }
            _ => io.complete(IoStatus::Failed),
        }
    }

    /// The queue pair failed: its I/O wait or fail, and reactor 0 hears of it.
    fn qp_failed(&self, ios: Vec<super::qpair::Returned>, by_host: bool, qp: &Weak<Qpair>) {
        let ours = match (self.qp.borrow().as_ref(), qp.upgrade()) {
            (Some(a), Some(b)) => Rc::ptr_eq(a, &b),
            _ => false,
        };
        if ours {
            self.qp.borrow_mut().take();
        }
        let id = self.shared.id;
        if self.shared.state() == ST_CONNECTED && !by_host {
            self.lost.set(true);
            reactor::send(0, move || ctrlr_failed(id));
        }
        for (io, nsid, bs) in ios {
            self.unavailable(io, nsid, bs);
        }
    }

    fn set_qp(self: &Rc<Self>, qp: Rc<Qpair>) {
        let weak_self = Rc::downgrade(self);
        let weak_qp = Rc::downgrade(&qp);
        qp.set_on_fail(Box::new(move |ios, by_host| {
            if let Some(l) = weak_self.upgrade() {
                l.qp_failed(ios, by_host, &weak_qp);
            } else {
                for (io, _, _) in ios {
                    io.complete(IoStatus::Failed);
                }
            }
        }));
        self.lost.set(false);
        let old = self.qp.borrow_mut().replace(qp);
        if let Some(old) = old {
            old.close();
        }
    }

    /// Resubmit (connected) or fail (fail-fast / failed / deleted) what waits.
    fn drain_retry(&self) {
        if self.shared.state() != ST_CONNECTED {
            self.lost.set(false);
        }
        let waiting: Vec<Waiting> = self.retry.borrow_mut().drain(..).collect();
        for w in waiting {
            if self.shared.state() == ST_CONNECTED {
                self.submit(w.io, w.nsid, w.bs);
            } else if self.shared.state() == ST_QUEUE {
                self.retry.borrow_mut().push_back(w);
            } else {
                w.io.complete(IoStatus::Failed);
            }
        }
    }

    fn close_qp(&self) {
        let qp = self.qp.borrow_mut().take();
        if let Some(qp) = qp {
            qp.close();
        }
    }
}

/// What enabling the controller learnt from its registers.
struct Enabled {
    vs: u32,
    /// CAP.MQES: largest queue size, 0's based.
    mqes: u16,
    /// CAP.MPSMIN in bytes.
    mpsmin: u64,
}

// ---------------------------------------------------------------------------
// Cross-reactor helpers

/// Run `f(local)` on every reactor that has a Local for `id`.
async fn each_local(id: u64, f: impl Fn(&Rc<Local>) + Send + Sync + Clone + 'static) {
    for r in 0..reactor::num_reactors() {
        let f = f.clone();
        reactor::run_on(r, move || async move {
            if let Some(l) = local_if_any(id) {
                f(&l);
            }
        })
        .await;
    }
}

// ---------------------------------------------------------------------------
// The controller (reactor 0)

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CState {
    Connected,
    Resetting,
    Failed,
    Deleting,
}

pub struct Ctrlr {
    pub opts: AttachOpts,
    pub shared: Arc<Shared>,
    addr: SocketAddr,
    hostid: [u8; 16],
    state: Cell<CState>,
    admin: RefCell<Option<Rc<Qpair>>>,
    pub namespaces: RefCell<Vec<NsInfo>>,
    pub bdevs: RefCell<Vec<String>>,
    ka: RefCell<Option<Poller>>,
    ka_busy: Rc<Cell<bool>>,
    io_queues: Cell<u32>,
    digests: Cell<(bool, bool)>,
    /// A queue pair failed while (re)connecting: the attempt is not good.
    lost_during_init: Cell<bool>,
}

thread_local! {
    static CTRLRS: RefCell<Vec<Rc<Ctrlr>>> = const { RefCell::new(Vec::new()) };
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

pub fn find(name: &str) -> Option<Rc<Ctrlr>> {
    CTRLRS.with(|c| c.borrow().iter().find(|c| c.opts.name == name).cloned())
}

pub fn all() -> Vec<Rc<Ctrlr>> {
    CTRLRS.with(|c| c.borrow().clone())
}

fn by_id(id: u64) -> Option<Rc<Ctrlr>> {
    CTRLRS.with(|c| c.borrow().iter().find(|c| c.shared.id == id).cloned())
}

fn trim_ascii(b: &[u8]) -> String {
    let s: String = b
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                c as char
            } else {
                '?'
            }
        })
        .collect();
    s.trim_end().to_string()
}

/// Decode Identify Controller.
pub fn parse_id_ctrl(b: &[u8], mpsmin_bytes: u64) -> CtrlrData {
    let mdts = b[id_ctrl::MDTS];
    CtrlrData {
        cntlid: le16(b, id_ctrl::CNTLID),
        vid: le16(b, id_ctrl::VID),
        sn: trim_ascii(&b[id_ctrl::SN..id_ctrl::SN + 20]),
        mn: trim_ascii(&b[id_ctrl::MN..id_ctrl::MN + 40]),
        fr: trim_ascii(&b[id_ctrl::FR..id_ctrl::FR + 8]),
        subnqn: trim_ascii(&b[id_ctrl::SUBNQN..id_ctrl::SUBNQN + 256]),
        ver: le32(b, id_ctrl::VER),
        max_xfer: if mdts == 0 || mdts > 20 {
            u64::MAX
        } else {
            mpsmin_bytes << mdts
        },
        ioccsz: le32(b, id_ctrl::IOCCSZ).max(4),
        nn: le32(b, id_ctrl::NN),
        oncs: le16(b, id_ctrl::ONCS),
        vwc: b[id_ctrl::VWC],
        kas: le16(b, id_ctrl::KAS),
        mqes: 0,
        cntrltype: b[id_ctrl::CNTRLTYPE],
    }
}

/// Decode Identify Namespace; `None` for an inactive or unusable one.
pub fn parse_id_ns(nsid: u32, b: &[u8]) -> Result<Option<NsInfo>, String> {
    let nsze = le64(b, id_ns::NSZE);
    let ncap = le64(b, id_ns::NCAP);
    if nsze == 0 || ncap == 0 {
        return Ok(None);
    }
    let flbas = b[id_ns::FLBAS] & 0x0F;
    let nlbaf = b[id_ns::NLBAF];
    if flbas > nlbaf {
        return Err(format!(
            "namespace {nsid}: FLBAS {flbas} names a format beyond NLBAF {nlbaf}"
        ));
    }
    let lbaf = le32(b, id_ns::LBAF0 + 4 * flbas as usize);
    let ms = lbaf & 0xFFFF;
    let lbads = (lbaf >> 16) & 0xFF;
    if ms != 0 {
        return Err(format!(
            "namespace {nsid}: LBA format with {ms} bytes of metadata is not supported"
        ));
    }
    if !(9..=16).contains(&lbads) {
        return Err(format!(
            "namespace {nsid}: LBA data size 2^{lbads} is not supported"
        ));
    }
    let mut nguid = [0u8; 16];
    nguid.copy_from_slice(&b[id_ns::NGUID..id_ns::NGUID + 16]);
    Ok(Some(NsInfo {
        nsid,
        block_size: 1 << lbads,
        num_blocks: nsze,
        uuid: None,
        nguid,
    }))
}

/// The UUID from a Namespace Identification Descriptor list (CNS 03h).
pub fn parse_ns_descs(b: &[u8]) -> Option<Uuid> {
    let mut off = 0;
    while off + 4 <= b.len() {
        let nidt = b[off];
        let nidl = b[off + 1] as usize;
        if nidt == 0 || nidl == 0 || off + 4 + nidl > b.len() {
            break;
        }
        if nidt == spec::nidt::UUID && nidl == 16 {
            let mut u = [0u8; 16];
            u.copy_from_slice(&b[off + 4..off + 20]);
            return Some(Uuid::from_bytes(u));
        }
        off += 4 + nidl;
    }
    None
}

impl Ctrlr {
    pub fn state_name(&self) -> &'static str {
        match self.state.get() {
            CState::Connected => "enabled",
            CState::Resetting => "resetting",
            CState::Failed => "failed",
            CState::Deleting => "deleting",
        }
    }

    pub fn data(&self) -> CtrlrData {
        reactor::sync::lock(&self.shared.data).clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn digests(&self) -> (bool, bool) {
        self.digests.get()
    }

    fn admin_qp(&self) -> Result<Rc<Qpair>, HostError> {
        self.admin
            .borrow()
            .clone()
            .ok_or_else(|| HostError::Disconnected("no admin queue".into()))
    }

    async fn admin_cmd(
        &self,
        what: &str,
        sqe: Sqe,
        out: Vec<u8>,
        in_len: usize,
    ) -> Result<(Cqe, Vec<u8>), HostError> {
        let qp = self.admin_qp()?;
        let (cqe, data) = with_timeout(ADMIN_TIMEOUT, qp.admin(sqe, out, in_len))
            .await
            .ok_or_else(|| HostError::Timeout(format!("waiting for {what}")))??;
        if !cqe.status.is_success() {
            return Err(HostError::Nvme {
                what: what.to_string(),
                status: cqe.status,
            });
        }
        Ok((cqe, data))
    }

    async fn prop_get(&self, ofst: u32, size8: bool) -> Result<u64, HostError> {
        let sqe = Sqe {
            opc: spec::fabrics::OPCODE,
            nsid: spec::fabrics::PROPERTY_GET as u32,
            cdw10: size8 as u32,
            cdw11: ofst,
            ..Sqe::default()
        };
        let (cqe, _) = self
            .admin_cmd(&format!("Property Get {ofst:#x}"), sqe, Vec::new(), 0)
            .await?;
        Ok(cqe.dw0 as u64 | ((cqe.dw1 as u64) << 32))
    }

    async fn prop_set(&self, ofst: u32, val: u32) -> Result<(), HostError> {
        let sqe = Sqe {
            opc: spec::fabrics::OPCODE,
            nsid: spec::fabrics::PROPERTY_SET as u32,
            cdw10: 0,
            cdw11: ofst,
            cdw12: val,
            ..Sqe::default()
        };
        self.admin_cmd(&format!("Property Set {ofst:#x}"), sqe, Vec::new(), 0)
            .await?;
        Ok(())
    }

    async fn identify(&self, cns: u8, nsid: u32) -> Result<Vec<u8>, HostError> {
        let sqe = Sqe {
            opc: spec::admin::IDENTIFY,
            nsid,
            cdw10: cns as u32,
            ..Sqe::default()
        };
        let (_, data) = self
            .admin_cmd(
                &format!("Identify CNS {cns:#04x} NSID {nsid}"),
                sqe,
                Vec::new(),
                4096,
            )
            .await?;
        Ok(data)
    }

    /// Connect the admin queue, enable the controller, identify it and its
    /// namespaces, set the number of queues, connect one I/O queue per
    /// reactor, start keep-alive.
    async fn connect_all(self: &Rc<Self>) -> Result<(), HostError> {
        let o = &self.opts;
        let params = QpParams {
            qid: 0,
            depth: ADMIN_DEPTH,
            hdgst: o.hdgst,
            ddgst: o.ddgst,
            kato_ms: o.kato_ms,
            hostid: self.hostid,
            cntlid: 0xFFFF,
            subnqn: o.subnqn.clone(),
            hostnqn: o.hostnqn.clone(),
            icd_max: 8192,
            max_xfer: 1 << 20,
            connect_timeout: o.connect_timeout,
        };
        let cntlid = self.connect_admin(&params).await?;
        let en = self.enable().await?;
        let data = self.identify_controller(cntlid, &en).await?;
        let discovery = o.subnqn == spec::DISCOVERY_NQN;
        let mut nss = Vec::new();
        if !discovery {
            self.set_number_of_queues().await?;
            let nsids = self.active_nsids().await?;
            nss = self.identify_namespaces(nsids).await?;
        }
        *reactor::sync::lock(&self.shared.data) = data.clone();
        self.adopt_namespaces(nss);
        if !discovery {
            self.connect_io_queues(&params, cntlid, en.mqes, &data)
                .await?;
        }
        self.start_keep_alive();
        Ok(())
    }

    /// Connect the admin queue (on this reactor); its failure fails the
    /// controller. Returns the CNTLID the Connect granted.
    async fn connect_admin(self: &Rc<Self>, params: &QpParams) -> Result<u16, HostError> {
        let (admin, cntlid) = Qpair::connect(self.addr, params).await?;
        let id = self.shared.id;
        admin.set_on_fail(Box::new(move |ios, by_host| {
            for (io, _, _) in ios {
                io.complete(IoStatus::Failed);
            }
            if !by_host {
                reactor::defer(move || ctrlr_failed(id));
            }
        }));
        self.digests.set(admin.digests());
        if let Some(old) = self.admin.borrow_mut().replace(admin) {
            old.close();
        }
        Ok(cntlid)
    }

    /// Enable the controller as SPDK does: read VS and CAP, disable it if
    /// CC.EN is set, set CC.EN=1 and wait for CSTS.RDY.
    async fn enable(&self) -> Result<Enabled, HostError> {
        let vs = self.prop_get(spec::prop::VS, false).await? as u32;
        let cap = self.prop_get(spec::prop::CAP, true).await?;
        let to_ms = (((cap >> 24) & 0xFF).max(1)) * 500;
        let cc = self.prop_get(spec::prop::CC, false).await? as u32;
        if cc & 1 != 0 {
            self.prop_set(spec::prop::CC, cc & !1).await?;
            self.wait_rdy(false, to_ms).await?;
        }
        self.prop_set(spec::prop::CC, (6 << 16) | (4 << 20) | 1)
            .await?;
        self.wait_rdy(true, to_ms).await?;
        Ok(Enabled {
            vs,
            mqes: (cap & 0xFFFF) as u16,
            mpsmin: 4096u64 << ((cap >> 48) & 0xF),
        })
    }

    /// Identify Controller: must name the subsystem we connected to.
    async fn identify_controller(&self, cntlid: u16, en: &Enabled) -> Result<CtrlrData, HostError> {
        let o = &self.opts;
        let idb = self.identify(spec::cns::CONTROLLER, 0).await?;
        let mut data = parse_id_ctrl(&idb, en.mpsmin);
        data.mqes = en.mqes;
        if data.cntlid != cntlid {
            tracing::warn!(ctrlr = %o.name, connect = cntlid, identify = data.cntlid, "CNTLID from Identify differs from the Connect response");
        }
        if data.subnqn != o.subnqn {
            return Err(HostError::Protocol(format!(
                "controller reports subsystem NQN '{}' but '{}' was connected",
                data.subnqn, o.subnqn
            )));
        }
        tracing::info!(ctrlr = %o.name, cntlid, vs = format!("{:#x}", en.vs), mn = %data.mn, sn = %data.sn, "controller enabled");
        Ok(data)
    }

    /// Ask for one I/O queue per reactor, up to `num_io_queues`; keep what
    /// the controller grants.
    async fn set_number_of_queues(&self) -> Result<(), HostError> {
        let o = &self.opts;
        let want = reactor::num_reactors()
            .min(o.num_io_queues)
            .clamp(1, 0xFFFF);
        let sqe = Sqe {
            opc: spec::admin::SET_FEATURES,
            cdw10: spec::fid::NUMBER_OF_QUEUES as u32,
            cdw11: (want - 1) | ((want - 1) << 16),
            ..Sqe::default()
        };
        let (cqe, _) = self
            .admin_cmd("Set Features Number of Queues", sqe, Vec::new(), 0)
            .await?;
        let granted = ((cqe.dw0 & 0xFFFF).min(cqe.dw0 >> 16) + 1).min(want);
        self.io_queues.set(granted);
        if granted < reactor::num_reactors() {
            tracing::warn!(ctrlr = %o.name, granted, reactors = reactor::num_reactors(), "fewer I/O queues than reactors: reactors without one fail their I/O");
        }
        Ok(())
    }

    /// The active namespace list, 1024 per page: a full page continues
    /// after its last NSID.
    async fn active_nsids(&self) -> Result<Vec<u32>, HostError> {
        let mut nsids: Vec<u32> = Vec::new();
        loop {
            let after = nsids.last().copied().unwrap_or(0);
            let list = self.identify(spec::cns::ACTIVE_NS_LIST, after).await?;
            let page: Vec<u32> = (0..1024)
                .map(|i| le32(&list, i * 4))
                .take_while(|&n| n != 0)
                .collect();
            if page.iter().any(|&n| n <= after || n >= 0xFFFF_FFFE)
                || page.windows(2).any(|w| w[1] <= w[0])
            {
                return Err(HostError::Protocol(format!(
                    "active namespace list after NSID {after} is not ascending or holds an invalid NSID"
                )));
            }
            let full = page.len() == 1024;
            nsids.extend(page);
            if !full || nsids.len() >= (1 << 20) {
                return Ok(nsids);
            }
        }
    }

    /// Identify Namespace (and its descriptors, for the UUID) of each NSID;
    /// unusable namespaces are skipped.
    async fn identify_namespaces(&self, nsids: Vec<u32>) -> Result<Vec<NsInfo>, HostError> {
        let o = &self.opts;
        let mut nss = Vec::new();
        for nsid in nsids {
            let b = self.identify(spec::cns::NAMESPACE, nsid).await?;
            let ns = match parse_id_ns(nsid, &b) {
                Ok(Some(ns)) => ns,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(ctrlr = %o.name, "skipping {e}");
                    continue;
                }
            };
            let uuid = match self.identify(spec::cns::NS_ID_DESCRIPTORS, nsid).await {
                Ok(d) => parse_ns_descs(&d),
                Err(e) => {
                    tracing::debug!(ctrlr = %o.name, nsid, error = %e, "no namespace descriptors");
                    None
                }
            };
            nss.push(NsInfo { uuid, ..ns });
        }
        Ok(nss)
    }

    /// The namespaces found at the first connect stay those of the bdevs: a
    /// reconnect that finds others only warns.
    fn adopt_namespaces(&self, nss: Vec<NsInfo>) {
        {
            let known = self.namespaces.borrow();
            if !known.is_empty() && *known != nss {
                tracing::warn!(ctrlr = %self.opts.name, "namespaces changed across the reconnect; keeping the bdevs as they were");
            }
        }
        if self.namespaces.borrow().is_empty() {
            *self.namespaces.borrow_mut() = nss;
        }
    }

    /// One I/O queue pair per reactor (those within the granted count),
    /// each connected on its reactor.
    async fn connect_io_queues(
        &self,
        params: &QpParams,
        cntlid: u16,
        mqes: u16,
        data: &CtrlrData,
    ) -> Result<(), HostError> {
        let depth = IO_DEPTH.min(mqes.saturating_add(1)).max(2);
        let mut qp = params.clone();
        qp.depth = depth;
        qp.cntlid = cntlid;
        qp.kato_ms = 0;
        qp.icd_max = (data.ioccsz as usize * 16).saturating_sub(64);
        qp.max_xfer = data.max_xfer;
        for r in 0..reactor::num_reactors().min(self.io_queues.get()) {
            let mut p = qp.clone();
            p.qid = r as u16 + 1;
            let addr = self.addr;
            let shared = self.shared.clone();
            reactor::run_on(r, move || async move {
                let (q, _) = Qpair::connect(addr, &p).await?;
                local(&shared).set_qp(q);
                Ok::<(), HostError>(())
            })
            .await?;
        }
        Ok(())
    }

    async fn wait_rdy(&self, rdy: bool, to_ms: u64) -> Result<(), HostError> {
        let deadline = reactor::now_ns() + to_ms * 1_000_000;
        loop {
            let csts = self.prop_get(spec::prop::CSTS, false).await? as u32;
            if csts & 2 != 0 {
                return Err(HostError::Protocol(
                    "controller reports a fatal status (CSTS.CFS)".into(),
                ));
            }
            if (csts & 1 != 0) == rdy {
                return Ok(());
            }
            if reactor::now_ns() > deadline {
                return Err(HostError::Timeout(format!(
                    "waiting for CSTS.RDY = {} ({to_ms} ms)",
                    rdy as u8
                )));
            }
            reactor::sleep(Duration::from_millis(1)).await;
        }
    }

    fn start_keep_alive(self: &Rc<Self>) {
        let kato = self.opts.kato_ms;
        if kato == 0 {
            return;
        }
        let weak = Rc::downgrade(self);
        let busy = self.ka_busy.clone();
        busy.set(false);
        let p = reactor::poller_register(
            Duration::from_millis((kato / 2).max(1) as u64),
            move || {
                let Some(c) = weak.upgrade() else {
                    return PollStatus::Idle;
                };
                if busy.replace(true) {
                    return PollStatus::Idle;
                }
                let b2 = busy.clone();
                reactor::spawn_local(async move {
                    let sqe = Sqe {
                        opc: spec::admin::KEEP_ALIVE,
                        ..Sqe::default()
                    };
                    let qp = c.admin.borrow().clone();
                    if let Some(qp) = qp {
                        let r = with_timeout(
                            Duration::from_millis(kato as u64),
                            qp.admin(sqe, Vec::new(), 0),
                        )
                        .await;
                        match r {
                            Some(Ok((cqe, _))) if cqe.status.is_success() => {}
                            Some(Ok((cqe, _))) => {
                                tracing::error!(ctrlr = %c.opts.name, status = %cqe.status, "Keep Alive failed");
                                ctrlr_failed(c.shared.id);
                            }
                            Some(Err(_)) => {}
                            None => {
                                tracing::error!(ctrlr = %c.opts.name, "Keep Alive not answered within KATO");
                                if let Some(a) = c.admin.borrow().as_ref() {
                                    a.close();
                                }
                                ctrlr_failed(c.shared.id);
                            }
                        }
                    }
                    b2.set(false);
                });
                PollStatus::Busy
            },
        );
        *self.ka.borrow_mut() = Some(p);
    }

    /// Close every queue pair (admin last). I/O in flight go back to their
    /// reactor's Local, which parks or fails them by the shared state.
    async fn disconnect_all(&self) {
        self.ka.borrow_mut().take();
        each_local(self.shared.id, |l| l.close_qp()).await;
        let admin = self.admin.borrow_mut().take();
        if let Some(a) = admin {
            a.close();
        }
    }

    fn set_io_state(&self, st: u8) {
        self.shared.state.store(st, Ordering::Release);
    }
}

/// Attach: connect, initialise, register one bdev per namespace. Returns
/// the bdev names.
pub async fn attach(opts: AttachOpts) -> Result<Vec<String>, HostError> {
    if find(&opts.name).is_some() {
        return Err(HostError::Exists(format!(
            "A controller named {} already exists and multipath is disabled",
            opts.name
        )));
    }
    let addr = resolve(&opts.traddr, &opts.trsvcid)?;
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let hostid = *Uuid::new_v5(&Uuid::NAMESPACE_OID, opts.hostnqn.as_bytes()).as_bytes();
    let c = Rc::new(Ctrlr {
        shared: Arc::new(Shared {
            id,
            state: AtomicU8::new(ST_CONNECTED),
            data: Mutex::new(CtrlrData::default()),
        }),
        opts,
        addr,
        hostid,
        // Not Connected until init is done: a failure during init is
        // attach's to report, not a reason to start reconnecting.
        state: Cell::new(CState::Resetting),
        admin: RefCell::new(None),
        namespaces: RefCell::new(Vec::new()),
        bdevs: RefCell::new(Vec::new()),
        ka: RefCell::new(None),
        ka_busy: Rc::new(Cell::new(false)),
        io_queues: Cell::new(0),
        digests: Cell::new((false, false)),
        lost_during_init: Cell::new(false),
    });
    // Registered first so a failure message during init finds it.
    CTRLRS.with(|l| l.borrow_mut().push(c.clone()));
    if let Err(e) = c.connect_all().await {
        c.state.set(CState::Deleting);
        c.set_io_state(ST_DELETED);
        c.disconnect_all().await;
        remove_locals(id).await;
        CTRLRS.with(|l| l.borrow_mut().retain(|x| x.shared.id != id));
        return Err(e);
    }
    let nss = c.namespaces.borrow().clone();
    let mut names = Vec::new();
    for (i, ns) in nss.iter().enumerate() {
        match super::nvme_bdev::register(&c, ns, i == 0) {
            Ok(n) => names.push(n),
            Err(e) => {
                tracing::error!(ctrlr = %c.opts.name, nsid = ns.nsid, error = %e, "cannot register the namespace's bdev");
                *c.bdevs.borrow_mut() = names.clone();
                let _ = detach(&c.opts.name).await;
                return Err(HostError::Io(format!(
                    "registering bdev for namespace {}: {e}",
                    ns.nsid
                )));
            }
        }
    }
    *c.bdevs.borrow_mut() = names.clone();
    c.state.set(CState::Connected);
    if c.lost_during_init.replace(false) {
        // A queue pair went down during init: the usual recovery.
        ctrlr_failed(id);
    }
    tracing::info!(ctrlr = %c.opts.name, addr = %c.addr, subnqn = %c.opts.subnqn, bdevs = ?names, "NVMe controller attached");
    Ok(names)
}

async fn remove_locals(id: u64) {
    for r in 0..reactor::num_reactors() {
        reactor::run_on(r, move || async move {
            let l = LOCALS.with(|m| m.borrow_mut().remove(&id));
            if let Some(l) = l {
                l.close_qp();
                l.drain_retry();
            }
        })
        .await;
    }
}

/// Detach: delete the bdevs, shut the controller down (CC.SHN), close.
pub async fn detach(name: &str) -> Result<(), HostError> {
    let c = find(name).ok_or_else(|| HostError::NotFound(format!("No such controller {name}")))?;
    if c.state.get() == CState::Deleting {
        // Another detach has it: only that one answers success.
        return Err(HostError::NotFound(format!("No such controller {name}")));
    }
    c.state.set(CState::Deleting);
    delete(&c, true).await;
    Ok(())
}

async fn delete(c: &Rc<Ctrlr>, shutdown: bool) {
    c.state.set(CState::Deleting);
    let names = c.bdevs.borrow().clone();
    for n in names.iter().rev() {
        if let Err(e) = bdev::unregister(n).await {
            tracing::debug!(bdev = %n, error = %e, "bdev already gone");
        }
    }
    c.set_io_state(ST_DELETED);
    c.ka.borrow_mut().take();
    each_local(c.shared.id, |l| {
        l.close_qp();
        l.drain_retry();
    })
    .await;
    if shutdown && c.admin.borrow().as_ref().is_some_and(|a| !a.is_failed()) {
        // Normal shutdown notification, waiting for SHST = complete; all of
        // it bounded so a hung controller cannot stall a detach or exit.
        let notify = async {
            let cc = c
                .prop_get(spec::prop::CC, false)
                .await
                .unwrap_or(0x0046_0001) as u32;
            if c.prop_set(spec::prop::CC, (cc & !(3 << 14)) | (1 << 14))
                .await
                .is_ok()
            {
                loop {
                    match c.prop_get(spec::prop::CSTS, false).await {
                        Ok(v) if (v >> 2) & 3 == 2 => break,
                        Ok(_) => reactor::sleep(Duration::from_millis(1)).await,
                        Err(_) => break,
                    }
                }
            }
        };
        if with_timeout(Duration::from_secs(2), notify).await.is_none() {
            tracing::warn!(ctrlr = %c.opts.name, "shutdown notification not completed within 2 s");
        }
    }
    c.disconnect_all().await;
    remove_locals(c.shared.id).await;
    CTRLRS.with(|l| l.borrow_mut().retain(|x| x.shared.id != c.shared.id));
    tracing::info!(ctrlr = %c.opts.name, "NVMe controller detached");
}

/// `bdev_nvme_reset_controller`: close every connection and connect again
/// (a new association, as SPDK's reset). I/O waits meanwhile. On failure
/// the usual rules apply: failed with no reconnect configured, otherwise
/// delayed reconnects continue in the background.
pub async fn reset(name: &str) -> Result<(), HostError> {
    let c = find(name).ok_or_else(|| HostError::NotFound(format!("No such controller {name}")))?;
    match c.state.get() {
        CState::Connected | CState::Failed => {}
        CState::Resetting => {
            return Err(HostError::Busy);
        }
        CState::Deleting => return Err(HostError::NotFound(name.to_string())),
    }
    c.state.set(CState::Resetting);
    c.set_io_state(ST_QUEUE);
    tracing::info!(ctrlr = %c.opts.name, "resetting controller");
    c.disconnect_all().await;
    c.lost_during_init.set(false);
    let res = match c.connect_all().await {
        Ok(()) if c.lost_during_init.get() => Err(HostError::Disconnected(
            "a queue pair failed while reconnecting".into(),
        )),
        r => r,
    };
    if c.state.get() == CState::Deleting {
        c.disconnect_all().await;
        remove_locals(c.shared.id).await;
        return Err(HostError::NotFound(name.to_string()));
    }
    match res {
        Ok(()) => {
            c.state.set(CState::Connected);
            c.set_io_state(ST_CONNECTED);
            each_local(c.shared.id, |l| l.drain_retry()).await;
            tracing::info!(ctrlr = %c.opts.name, "controller reset done");
            Ok(())
        }
        Err(e) => {
            tracing::warn!(ctrlr = %c.opts.name, error = %e, "controller reset failed");
            // Hand over to the reconnect logic (it retries or gives up).
            c.state.set(CState::Connected);
            ctrlr_failed(c.shared.id);
            Err(e)
        }
    }
}

/// A queue pair of controller `id` failed (runs on reactor 0).
pub fn ctrlr_failed(id: u64) {
    let Some(c) = by_id(id) else { return };
    if c.state.get() == CState::Resetting {
        c.lost_during_init.set(true);
    }
    if c.state.get() != CState::Connected {
        return;
    }
    c.state.set(CState::Resetting);
    c.set_io_state(ST_QUEUE);
    tracing::warn!(ctrlr = %c.opts.name, "controller connection lost; resetting");
    reactor::spawn_local(async move { reconnect_loop(c).await });
}

/// SPDK's reset + delayed-reconnect logic
/// (`bdev_nvme_check_op_after_reset`).
async fn reconnect_loop(c: Rc<Ctrlr>) {
    let start = reactor::now_ns();
    let o = c.opts.clone();
    loop {
        c.disconnect_all().await;
        if c.state.get() == CState::Deleting {
            return;
        }
        c.lost_during_init.set(false);
        let res = match c.connect_all().await {
            Ok(()) if c.lost_during_init.get() => Err(HostError::Disconnected(
                "a queue pair failed while reconnecting".into(),
            )),
            r => r,
        };
        match res {
            Ok(()) => {
                if c.state.get() == CState::Deleting {
                    // Detached meanwhile: undo what this attempt set up.
                    c.disconnect_all().await;
                    remove_locals(c.shared.id).await;
                    return;
                }
                c.state.set(CState::Connected);
                c.set_io_state(ST_CONNECTED);
                each_local(c.shared.id, |l| l.drain_retry()).await;
                tracing::info!(ctrlr = %o.name, "controller reconnected");
                return;
            }
            Err(e) => {
                tracing::warn!(ctrlr = %o.name, error = %e, "reconnect failed");
            }
        }
        if c.state.get() == CState::Deleting {
            return;
        }
        if o.reconnect_delay_sec == 0 {
            // No reconnect configured: the controller stays failed.
            c.state.set(CState::Failed);
            c.set_io_state(ST_FAILED);
            c.disconnect_all().await;
            each_local(c.shared.id, |l| l.drain_retry()).await;
            tracing::error!(ctrlr = %o.name, "controller failed (no reconnect configured: ctrlr_loss_timeout_sec is 0)");
            return;
        }
        let elapsed_s = (reactor::now_ns() - start) / 1_000_000_000;
        if o.ctrlr_loss_timeout_sec >= 0 && elapsed_s >= o.ctrlr_loss_timeout_sec as u64 {
            tracing::error!(ctrlr = %o.name, "ctrlr_loss_timeout_sec ({}) expired; deleting the controller and its bdevs", o.ctrlr_loss_timeout_sec);
            c.set_io_state(ST_FAILED);
            each_local(c.shared.id, |l| l.drain_retry()).await;
            delete(&c, false).await;
            return;
        }
        if o.fast_io_fail_timeout_sec != 0
            && elapsed_s >= o.fast_io_fail_timeout_sec as u64
            && c.shared.state() == ST_QUEUE
        {
            tracing::warn!(ctrlr = %o.name, "fast_io_fail_timeout_sec ({}) expired; failing I/O until reconnected", o.fast_io_fail_timeout_sec);
            c.set_io_state(ST_FAIL_FAST);
            each_local(c.shared.id, |l| l.drain_retry()).await;
        }
        reactor::sleep(Duration::from_secs(o.reconnect_delay_sec as u64)).await;
        if c.state.get() == CState::Deleting {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_ns_parsing() {
        let mut b = vec![0u8; 4096];
        b[0..8].copy_from_slice(&1000u64.to_le_bytes());
        b[8..16].copy_from_slice(&1000u64.to_le_bytes());
        b[id_ns::LBAF0 + 2] = 12;
        let ns = parse_id_ns(1, &b).unwrap().unwrap();
        assert_eq!((ns.block_size, ns.num_blocks), (4096, 1000));
        // NCAP 0: not present.
        let mut z = b.clone();
        z[8..16].fill(0);
        assert!(parse_id_ns(1, &z).unwrap().is_none());
        // Metadata is refused with a reason.
        let mut m = b.clone();
        m[id_ns::LBAF0] = 8;
        assert!(parse_id_ns(1, &m).unwrap_err().contains("metadata"));
        // FLBAS beyond NLBAF.
        let mut f = b.clone();
        f[id_ns::FLBAS] = 2;
        assert!(parse_id_ns(1, &f).is_err());
        let mut l = b;
        l[id_ns::LBAF0 + 2] = 40;
        assert!(parse_id_ns(1, &l).is_err());
    }

    #[test]
    fn ns_descriptors() {
        let mut b = vec![0u8; 4096];
        // NGUID first, then UUID, then CSI.
        b[0] = spec::nidt::NGUID;
        b[1] = 16;
        b[20] = spec::nidt::UUID;
        b[21] = 16;
        for i in 0..16 {
            b[24 + i] = i as u8 + 1;
        }
        b[40] = spec::nidt::CSI;
        b[41] = 1;
        let u = parse_ns_descs(&b).unwrap();
        assert_eq!(u.as_bytes()[0], 1);
        assert_eq!(u.as_bytes()[15], 16);
        // A truncated descriptor ends the walk without reading past the end.
        let mut t = vec![0u8; 10];
        t[0] = spec::nidt::UUID;
        t[1] = 16;
        assert!(parse_ns_descs(&t).is_none());
        assert!(parse_ns_descs(&[0u8; 4096]).is_none());
    }

    #[test]
    fn id_ctrl_parsing() {
        let mut b = vec![0u8; 4096];
        b[id_ctrl::SN..id_ctrl::SN + 4].copy_from_slice(b"SN01");
        b[id_ctrl::SN + 4..id_ctrl::SN + 20].fill(b' ');
        b[id_ctrl::MDTS] = 5;
        b[id_ctrl::CNTLID..id_ctrl::CNTLID + 2].copy_from_slice(&7u16.to_le_bytes());
        b[id_ctrl::ONCS] = 0x0C;
        b[id_ctrl::IOCCSZ..id_ctrl::IOCCSZ + 4].copy_from_slice(&260u32.to_le_bytes());
        b[id_ctrl::SUBNQN..id_ctrl::SUBNQN + 8].copy_from_slice(b"nqn.test");
        let d = parse_id_ctrl(&b, 4096);
        assert_eq!(d.sn, "SN01");
        assert_eq!(d.max_xfer, 128 * 1024);
        assert_eq!(d.cntlid, 7);
        assert!(d.supports_dsm() && d.supports_write_zeroes());
        assert_eq!(d.ioccsz, 260);
        assert_eq!(d.subnqn, "nqn.test");
        b[id_ctrl::MDTS] = 0;
        assert_eq!(parse_id_ctrl(&b, 4096).max_xfer, u64::MAX);
    }
}
