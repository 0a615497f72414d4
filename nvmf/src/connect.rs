//! Fabrics Connect (NVMe-oF 1.1 section 3.3): admit a new queue into a
//! subsystem, for any transport. The admin queue (QID 0) creates the
//! controller; an I/O queue joins an existing, enabled one.
//!
//! Errors are the Connect response itself: Connect Invalid Parameters with
//! the offset of the offending field (in the SQE or in the Connect data),
//! Controller Busy, Invalid Host, Invalid Queue Identifier.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use reactor::DmaBuf;

use crate::ctrlr::Done;
use crate::spec::*;
use crate::target::{self, lock, Ctrl, CtrlState, ListenAddr, SubType, TransportOpts};

/// The transport queue a Connect arrived on.
pub struct QueueInfo<'a> {
    /// The transport's id for the queue (connection).
    pub conn: u64,
    /// The reactor that owns the queue.
    pub reactor: u32,
    /// The address the host connected to.
    pub listen: &'a ListenAddr,
    /// The host's address, for logs.
    pub peer: &'a str,
}

/// A queue the Connect admitted.
pub struct Admitted {
    pub ctrl: Arc<Ctrl>,
    pub qid: u16,
    /// 0's based.
    pub sqsize: u16,
    /// The host disabled SQ flow control (CATTR).
    pub sqflow_off: bool,
}

/// Connect Invalid Parameters, pointing at byte `off` of the Connect data
/// (`data` true) or of the SQE.
pub fn invalid(data: bool, off: u16) -> Done {
    Done {
        status: Status::specific(csc::CONNECT_INVALID_PARAMETERS),
        dw0: ((data as u32) << 16) | off as u32,
        ..Default::default()
    }
}

/// Admit the queue `q` for the Connect command `sqe` with its data (`data`,
/// `data_len` bytes announced by the SGL).
pub fn admit(
    q: &QueueInfo<'_>,
    opts: &TransportOpts,
    sqe: &Sqe,
    data: Option<&DmaBuf>,
    data_len: u32,
) -> Result<Admitted, Done> {
    let cmd = ConnectCmd::from_sqe(sqe);
    if cmd.recfmt != 0 {
        return Err(Done::err(Status::specific(
            csc::CONNECT_INCOMPATIBLE_FORMAT,
        )));
    }
    let data = match data {
        Some(b) if data_len as usize >= CONNECT_DATA_SIZE => {
            ConnectData::parse(&b.as_slice()[..CONNECT_DATA_SIZE])
        }
        _ => Err(ConnectDataError::Length(data_len as usize)),
    };
    let data = data.map_err(|e| {
        tracing::warn!(conn = q.conn, error = %e, "bad Connect data");
        match e {
            ConnectDataError::Length(_) => Done::err(Status::generic(sc::DATA_SGL_LENGTH_INVALID)),
            e => invalid(true, e.offset()),
        }
    })?;
    let Some(subsys) = target::find_subsystem(&data.subnqn) else {
        tracing::warn!(subnqn = %data.subnqn, "Connect to an unknown subsystem");
        return Err(invalid(true, CONNECT_DATA_SUBNQN_OFF));
    };
    if subsys.subtype == SubType::Nvme && !subsys.listens_on(q.listen) {
        tracing::warn!(subnqn = %data.subnqn, listen = %q.listen, "subsystem does not listen on this address");
        return Err(invalid(true, CONNECT_DATA_SUBNQN_OFF));
    }
    if !subsys.host_allowed(&data.hostnqn) {
        tracing::warn!(subnqn = %data.subnqn, hostnqn = %data.hostnqn, "host not allowed");
        return Err(Done {
            status: Status::specific(csc::CONNECT_INVALID_HOST),
            ..Default::default()
        });
    }
    if cmd.sqsize == 0 {
        return Err(invalid(false, CONNECT_SQE_SQSIZE_OFF));
    }
    let req = Checked {
        q,
        opts,
        cmd: &cmd,
        data: &data,
        subsys,
    };
    let ctrl = if cmd.qid == 0 {
        create_controller(req)?
    } else {
        join_controller(req)?
    };
    Ok(Admitted {
        ctrl,
        qid: cmd.qid,
        sqsize: cmd.sqsize,
        sqflow_off: cmd.cattr & ConnectCmd::CATTR_DISABLE_SQFLOW != 0,
    })
}

/// A Connect past the checks both queue kinds share.
struct Checked<'a, 'q> {
    q: &'a QueueInfo<'q>,
    opts: &'a TransportOpts,
    cmd: &'a ConnectCmd,
    data: &'a ConnectData,
    subsys: Arc<target::Subsystem>,
}

/// Admin queue: a new controller in the subsystem.
fn create_controller(req: Checked<'_, '_>) -> Result<Arc<Ctrl>, Done> {
    if req.cmd.sqsize as u32 >= req.opts.max_aq_depth.max(32) {
        return Err(invalid(false, CONNECT_SQE_SQSIZE_OFF));
    }
    if req.data.cntlid != 0xFFFF {
        return Err(invalid(true, CONNECT_DATA_CNTLID_OFF));
    }
    // KATO 0 means no keep-alive; a discovery controller is then still
    // reaped after DISCOVERY_IDLE_MS (the transport's keep-alive poller).
    let kato = req.cmd.kato;
    let ctrl = {
        let mut ss = lock(&req.subsys.state);
        let Some(id) = target::alloc_cntlid(&req.subsys, &mut ss) else {
            return Err(Done::err(Status::specific(csc::CONNECT_CONTROLLER_BUSY)));
        };
        let c = Arc::new(Ctrl {
            cntlid: id,
            subsys: req.subsys.clone(),
            hostnqn: req.data.hostnqn.clone(),
            hostid: req.data.hostid,
            kato_ms: kato.into(),
            admin_reactor: req.q.reactor,
            admin_conn: req.q.conn,
            ready: false.into(),
            last_ka_ns: reactor::now_ns().into(),
            listen: req.q.listen.clone(),
            state: std::sync::Mutex::new(CtrlState::default()),
            destroyed: false.into(),
        });
        ss.ctrls.push(c.clone());
        c
    };
    tracing::info!(nqn = %req.subsys.nqn, cntlid = ctrl.cntlid, hostnqn = %req.data.hostnqn, kato, peer = %req.q.peer, "controller created");
    Ok(ctrl)
}

/// I/O queue: joins the enabled controller the Connect data names.
fn join_controller(req: Checked<'_, '_>) -> Result<Arc<Ctrl>, Done> {
    if req.subsys.subtype == SubType::Discovery {
        return Err(invalid(false, CONNECT_SQE_QID_OFF));
    }
    let ctrl = lock(&req.subsys.state)
        .ctrls
        .iter()
        .find(|c| c.cntlid == req.data.cntlid)
        .cloned();
    let Some(ctrl) = ctrl else {
        return Err(invalid(true, CONNECT_DATA_CNTLID_OFF));
    };
    if ctrl.hostnqn != req.data.hostnqn {
        return Err(invalid(true, CONNECT_DATA_HOSTNQN_OFF));
    }
    if !ctrl.ready.load(Ordering::Acquire) {
        return Err(invalid(false, CONNECT_SQE_QID_OFF));
    }
    if req.cmd.sqsize >= req.opts.max_queue_depth {
        return Err(invalid(false, CONNECT_SQE_SQSIZE_OFF));
    }
    {
        let mut cs = lock(&ctrl.state);
        let granted = if cs.num_io_queues == 0 {
            req.opts.max_io_qpairs_per_ctrlr as u32
        } else {
            cs.num_io_queues
        };
        if req.cmd.qid as u32 > granted {
            return Err(invalid(false, CONNECT_SQE_QID_OFF));
        }
        if cs.io_qpairs.contains_key(&req.cmd.qid) {
            return Err(Done::err(Status::specific(csc::INVALID_QUEUE_IDENTIFIER)));
        }
        cs.io_qpairs
            .insert(req.cmd.qid, (req.q.reactor, req.q.conn));
    }
    Ok(ctrl)
}
