//! Admin and fabrics command semantics of a controller: properties,
//! Identify, Get Log Page, features, and the discovery log. Everything here
//! is synchronous and runs on the admin queue's reactor; the data path is in
//! `tcp.rs`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::spec::*;
use crate::target::{self, lock, Ctrl, SubType, TransportOpts, AER_LIMIT};

/// NVMe version we report (1.3: NS descriptors, no 2.0 features).
pub const VS: u32 = 0x0001_0300;
/// CAP.TO in 500 ms units (15 s).
const CAP_TO: u64 = 30;

/// Result of an admin command handled synchronously.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Done {
    pub status: Status,
    pub dw0: u32,
    pub dw1: u32,
    /// Controller-to-host data (sent before the CQE).
    pub data: Option<Vec<u8>>,
}

impl Done {
    pub fn ok() -> Done {
        Done::default()
    }
    pub fn dw0(dw0: u32) -> Done {
        Done {
            dw0,
            ..Default::default()
        }
    }
    pub fn err(status: Status) -> Done {
        Done {
            status,
            ..Default::default()
        }
    }
    pub fn data(d: Vec<u8>) -> Done {
        Done {
            data: Some(d),
            ..Default::default()
        }
    }
}

fn invalid_field() -> Done {
    Done::err(Status::generic(sc::INVALID_FIELD))
}

pub fn cap(opts: &TransportOpts, discovery: bool) -> u64 {
    let mqes = if discovery {
        opts.max_aq_depth.max(32) - 1
    } else {
        opts.max_queue_depth as u32 - 1
    };
    (mqes as u64 & 0xFFFF) | (1 << 16) | (CAP_TO << 24) | (1 << 37)
}

/// Property Get / Set (fabrics). `Err` carries the status.
pub fn property_get(c: &Ctrl, opts: &TransportOpts, sqe: &Sqe) -> Done {
    let size8 = sqe.cdw10 & 7 == 1;
    if sqe.cdw10 & 7 > 1 {
        return invalid_field();
    }
    let ofst = sqe.cdw11;
    let st = lock(&c.state);
    let v: u64 = match (ofst, size8) {
        (prop::CAP, true) => cap(opts, c.is_discovery()),
        (prop::CAP, false) => cap(opts, c.is_discovery()) & 0xFFFF_FFFF,
        (o, false) if o == prop::CAP + 4 => cap(opts, c.is_discovery()) >> 32,
        (prop::VS, false) => VS as u64,
        (prop::CC, false) => st.cc as u64,
        (prop::CSTS, false) => st.csts as u64,
        _ => return invalid_field(),
    };
    Done {
        dw0: v as u32,
        dw1: (v >> 32) as u32,
        ..Default::default()
    }
}

/// What a Property Set asks the transport to do afterwards.
#[derive(Debug, PartialEq, Eq)]
pub enum CcAction {
    None,
    /// EN 1→0 or shutdown: close the I/O queues.
    CloseIoQueues,
}

pub fn property_set(c: &Arc<Ctrl>, sqe: &Sqe) -> (Done, CcAction) {
    let size8 = sqe.cdw10 & 7 == 1;
    if sqe.cdw10 & 7 > 1 || size8 || sqe.cdw11 != prop::CC {
        return (invalid_field(), CcAction::None);
    }
    let new = sqe.cdw12;
    let mut st = lock(&c.state);
    let old = st.cc;
    st.cc = new;
    let mut action = CcAction::None;
    let en_old = old & 1 != 0;
    let en_new = new & 1 != 0;
    if !en_old && en_new {
        let iosqes = (new >> 16) & 0xF;
        let iocqes = (new >> 20) & 0xF;
        let mps = (new >> 7) & 0xF;
        let ams = (new >> 11) & 7;
        let css = (new >> 4) & 7;
        if (iosqes != 6 || iocqes != 4) && !c.is_discovery() || mps != 0 || ams != 0 || css != 0 {
            tracing::warn!(
                cc = format_args!("{new:#x}"),
                "CC enable with unsupported parameters"
            );
            st.csts |= 2; // CFS
        } else {
            st.csts |= 1;
            c.ready.store(true, Ordering::Release);
        }
    } else if en_old && !en_new {
        st.csts &= !1;
        st.csts &= !(3 << 2);
        c.ready.store(false, Ordering::Release);
        action = CcAction::CloseIoQueues;
    }
    let shn_old = (old >> 14) & 3;
    let shn_new = (new >> 14) & 3;
    if shn_new != 0 && shn_old == 0 {
        // Shutdown completes at once: I/O queues go, SHST = complete.
        st.csts = (st.csts & !(3 << 2)) | (2 << 2);
        c.ready.store(false, Ordering::Release);
        action = CcAction::CloseIoQueues;
    } else if shn_new == 0 && shn_old != 0 {
        st.csts &= !(3 << 2);
    }
    (Done::ok(), action)
}

fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

pub fn identify_ctrl(c: &Ctrl, opts: &TransportOpts) -> Vec<u8> {
    use id_ctrl::*;
    let mut b = vec![0u8; SIZE];
    let s = &c.subsys;
    let disc = c.is_discovery();
    put_ascii_padded(&mut b[SN..SN + 20], &s.serial_number);
    put_ascii_padded(&mut b[MN..MN + 40], &s.model_number);
    put_ascii_padded(&mut b[FR..FR + 8], env!("CARGO_PKG_VERSION"));
    b[RAB] = 6;
    b[CMIC] = if disc { 0 } else { 0x03 };
    b[MDTS] = opts.mdts();
    put16(&mut b, CNTLID, c.cntlid);
    put32(&mut b, VER, VS);
    put32(
        &mut b,
        OAES,
        if disc {
            aen::CFG_DISCOVERY
        } else {
            aen::CFG_NS_ATTR
        },
    );
    put32(&mut b, CTRATT, 1); // 128-bit host identifier
    b[CNTRLTYPE] = if disc { 2 } else { 1 };
    b[ACL] = 3;
    b[AERL] = (AER_LIMIT - 1) as u8;
    b[FRMW] = 0x03;
    b[LPA] = 0x04 | if disc { 0 } else { 0x02 };
    b[ELPE] = 127;
    put16(&mut b, KAS, opts.kas.max(1));
    b[SQES] = 0x66;
    b[CQES] = 0x44;
    let maxcmd = if disc {
        opts.max_aq_depth.max(32)
    } else {
        opts.max_queue_depth as u32
    };
    put16(&mut b, MAXCMD, maxcmd as u16);
    if !disc {
        put32(&mut b, NN, s.max_namespaces);
        put16(&mut b, ONCS, 0x000C); // DSM + Write Zeroes
                                     // VWC present; bits 2:1 = 10b: flush with NSID FFFFFFFFh not supported.
        b[VWC] = 0x01 | 0x04;
        put32(&mut b, MNAN, s.max_namespaces);
        put32(&mut b, IOCCSZ, opts.ioccsz());
        put32(&mut b, IORCSZ, 1);
    }
    put32(&mut b, SGLS, 0x0010_0001);
    put_nul_padded(&mut b[SUBNQN..SUBNQN + 256], &s.nqn);
    b[MSDBD] = 1;
    b
}

pub fn identify_ns(ns: &target::Namespace, opts: &TransportOpts) -> Vec<u8> {
    use id_ns::*;
    let mut b = vec![0u8; SIZE];
    let n = ns.num_blocks();
    put64(&mut b, NSZE, n);
    put64(&mut b, NCAP, n);
    put64(&mut b, NUSE, n);
    b[NMIC] = 1;
    // DLFEAT stays 0: what deallocated blocks read as depends on the bdev.
    if ns.read_only {
        b[NSATTR] = 1;
    }
    b[NGUID..NGUID + 16].copy_from_slice(&ns.nguid);
    if let Some(e) = ns.eui64 {
        b[EUI64..EUI64 + 8].copy_from_slice(&e);
    }
    let lbads = ns.block_size.trailing_zeros() as u8;
    b[LBAF0 + 2] = lbads;
    // NOIOB: optimal I/O boundary of the bdev in blocks if it is a power of two.
    let oib = ns.bdev.optimal_io_boundary();
    if oib.is_power_of_two() && oib <= opts.max_xfer() / ns.block_size {
        put16(&mut b, 46, oib as u16);
    }
    b
}

pub fn ns_descriptors(ns: &target::Namespace) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    let mut o = 0;
    let mut push = |t: u8, v: &[u8]| {
        b[o] = t;
        b[o + 1] = v.len() as u8;
        b[o + 4..o + 4 + v.len()].copy_from_slice(v);
        o += 4 + v.len();
    };
    if let Some(e) = ns.eui64 {
        push(nidt::EUI64, &e);
    }
    push(nidt::NGUID, &ns.nguid);
    push(nidt::UUID, ns.uuid.as_bytes());
    push(nidt::CSI, &[0]);
    b
}

pub fn identify(c: &Ctrl, opts: &TransportOpts, sqe: &Sqe) -> Done {
    let cns = sqe.cdw10 as u8;
    let disc = c.is_discovery();
    match cns {
        cns::CONTROLLER => Done::data(identify_ctrl(c, opts)),
        _ if disc => invalid_field(),
        cns::NAMESPACE => {
            let nsid = sqe.nsid;
            if nsid == 0 || nsid == 0xFFFF_FFFF || nsid > c.subsys.max_namespaces {
                return Done::err(Status::generic(sc::INVALID_NAMESPACE_OR_FORMAT));
            }
            match c.subsys.namespace(nsid) {
                Some(ns) => Done::data(identify_ns(&ns, opts)),
                // Inactive but valid: zeroes.
                None => Done::data(vec![0u8; 4096]),
            }
        }
        cns::ACTIVE_NS_LIST => {
            if sqe.nsid >= 0xFFFF_FFFE {
                return Done::err(Status::generic(sc::INVALID_NAMESPACE_OR_FORMAT));
            }
            let mut b = vec![0u8; 4096];
            for (i, id) in c
                .subsys
                .active_nsids()
                .into_iter()
                .filter(|&n| n > sqe.nsid)
                .take(1024)
                .enumerate()
            {
                put32(&mut b, i * 4, id);
            }
            Done::data(b)
        }
        cns::NS_ID_DESCRIPTORS => match c.subsys.namespace(sqe.nsid) {
            Some(ns) => Done::data(ns_descriptors(&ns)),
            None => Done::err(Status::generic(sc::INVALID_NAMESPACE_OR_FORMAT)),
        },
        _ => invalid_field(),
    }
}

/// Build the discovery log page for a host connected through `local`
/// (the address its socket is bound to, substituted for wildcard
/// listeners).
pub fn discovery_log(hostnqn: &str, local_ip: &str) -> Vec<u8> {
    use disc_log::*;
    let (genctr, subs, port_ids) = {
        let t = target::tgt();
        (t.discovery_genctr, t.subsystems.clone(), t.port_ids.clone())
    };
    let mut entries: Vec<Vec<u8>> = Vec::new();
    for s in subs.iter() {
        if !s.host_allowed(hostnqn) {
            continue;
        }
        let listeners = lock(&s.state).listeners.clone();
        for l in listeners {
            let mut e = vec![0u8; ENTRY_SIZE];
            e[TRTYPE] = TRTYPE_TCP;
            e[ADRFAM] = match l.adrfam {
                target::Adrfam::Ipv4 => ADRFAM_IPV4,
                target::Adrfam::Ipv6 => ADRFAM_IPV6,
            };
            e[SUBTYPE] = match s.subtype {
                SubType::Nvme => SUBTYPE_NVME,
                SubType::Discovery => SUBTYPE_CURRENT_DISCOVERY,
            };
            e[TREQ] = TREQ_NOT_REQUIRED | 0x04;
            put16(&mut e, PORTID, port_ids.get(&l).copied().unwrap_or(0));
            put16(&mut e, CNTLID, 0xFFFF);
            put16(&mut e, ASQSZ, 32);
            put_nul_padded(&mut e[TRSVCID..TRSVCID + 32], &l.trsvcid);
            put_nul_padded(&mut e[SUBNQN..SUBNQN + 256], &s.nqn);
            let addr = if l.traddr == "0.0.0.0" || l.traddr == "::" {
                local_ip
            } else {
                &l.traddr
            };
            put_nul_padded(&mut e[TRADDR..TRADDR + 256], addr);
            entries.push(e);
        }
    }
    let mut b = vec![0u8; HEADER_SIZE + entries.len() * ENTRY_SIZE];
    put64(&mut b, GENCTR, genctr);
    put64(&mut b, NUMREC, entries.len() as u64);
    for (i, e) in entries.iter().enumerate() {
        let o = HEADER_SIZE + i * ENTRY_SIZE;
        b[o..o + ENTRY_SIZE].copy_from_slice(e);
    }
    b
}

/// Get Log Page. `local_ip` is used by the discovery log.
pub fn get_log_page(c: &Ctrl, sqe: &Sqe, local_ip: &str, xfer: u32) -> Done {
    let lid = sqe.cdw10 as u8;
    let rae = sqe.cdw10 & (1 << 15) != 0;
    let numd = ((sqe.cdw10 >> 16) | ((sqe.cdw11 & 0xFFFF) << 16)) as u64 + 1;
    let len = numd * 4;
    let lpo = sqe.cdw12 as u64 | ((sqe.cdw13 as u64) << 32);
    if !lpo.is_multiple_of(4) || len > xfer as u64 {
        return invalid_field();
    }
    let disc = c.is_discovery();
    let page: Vec<u8> = match lid {
        lid::DISCOVERY if disc => discovery_log(&c.hostnqn, local_ip),
        lid::ERROR => vec![0u8; 64],
        lid::SMART if !disc => {
            let mut p = vec![0u8; 512];
            put16(&mut p, 1, 273 + 25); // composite temperature, Kelvin
            p[3] = 100; // available spare
            p[4] = 10; // spare threshold
            p
        }
        lid::FW_SLOT if !disc => {
            let mut p = vec![0u8; 512];
            p[0] = 1;
            put_ascii_padded(&mut p[8..16], env!("CARGO_PKG_VERSION"));
            p
        }
        lid::CHANGED_NS if !disc => {
            let mut st = lock(&c.state);
            let mut p = vec![0u8; 4096];
            for (i, n) in st.changed_ns.iter().enumerate() {
                put32(&mut p, i * 4, *n);
            }
            if !rae {
                st.changed_ns.clear();
                st.masked.retain(|&e| e != aen::NS_CHANGED);
            }
            p
        }
        lid::CMD_EFFECTS if !disc => {
            let mut p = vec![0u8; 4096];
            for op in [
                admin::GET_LOG_PAGE,
                admin::IDENTIFY,
                admin::ABORT,
                admin::SET_FEATURES,
                admin::GET_FEATURES,
                admin::ASYNC_EVENT_REQUEST,
                admin::KEEP_ALIVE,
            ] {
                put32(&mut p, op as usize * 4, 1);
            }
            for op in [
                nvm::FLUSH,
                nvm::WRITE,
                nvm::WRITE_ZEROES,
                nvm::DATASET_MANAGEMENT,
            ] {
                // CSUPP | LBCC (logical block content change)
                put32(&mut p, 1024 + op as usize * 4, 0x3);
            }
            put32(&mut p, 1024 + nvm::READ as usize * 4, 1);
            p
        }
        _ => return Done::err(Status::specific(csc::INVALID_LOG_PAGE)),
    };
    if lid == lid::DISCOVERY && !rae {
        lock(&c.state)
            .masked
            .retain(|&e| e != aen::DISCOVERY_CHANGED);
    }
    if lpo >= page.len() as u64 && !(lpo == 0 && page.is_empty()) {
        return invalid_field();
    }
    let mut out = vec![0u8; len as usize];
    let start = lpo as usize;
    let n = (page.len() - start).min(len as usize);
    out[..n].copy_from_slice(&page[start..start + n]);
    Done::data(out)
}

pub fn set_features(c: &Arc<Ctrl>, opts: &TransportOpts, sqe: &Sqe) -> Done {
    let fid = sqe.cdw10 as u8;
    if sqe.cdw10 & (1 << 31) != 0 {
        return Done::err(Status::specific(csc::FEATURE_NOT_SAVEABLE));
    }
    let disc = c.is_discovery();
    let mut st = lock(&c.state);
    match fid {
        fid::KEEP_ALIVE_TIMER => {
            if sqe.cdw11 == 0 {
                return Done::err(Status::generic(sc::KEEP_ALIVE_INVALID));
            }
            // Round up to the KAS granularity (100 ms units).
            let gran = opts.kas.max(1) as u32 * 100;
            let kato = sqe.cdw11.div_ceil(gran) * gran;
            c.kato_ms.store(kato, Ordering::Release);
            c.last_ka_ns.store(reactor::now_ns(), Ordering::Release);
            Done::ok()
        }
        fid::ASYNC_EVENT_CONFIG => {
            st.aec = sqe.cdw11;
            Done::ok()
        }
        _ if disc => invalid_field(),
        fid::NUMBER_OF_QUEUES => {
            let nsqr = sqe.cdw11 & 0xFFFF;
            let ncqr = sqe.cdw11 >> 16;
            if nsqr == 0xFFFF || ncqr == 0xFFFF {
                return invalid_field();
            }
            if !st.io_qpairs.is_empty() {
                return Done::err(Status::generic(sc::COMMAND_SEQUENCE_ERROR));
            }
            let max = opts.max_io_qpairs_per_ctrlr as u32;
            let n = (nsqr.max(ncqr) + 1).min(max);
            st.num_io_queues = n;
            Done::dw0((n - 1) | ((n - 1) << 16))
        }
        fid::VOLATILE_WRITE_CACHE => Done::err(Status::specific(csc::FEATURE_NOT_CHANGEABLE)),
        fid::HOST_IDENTIFIER => Done::err(Status::generic(sc::COMMAND_SEQUENCE_ERROR)),
        fid::ARBITRATION
        | fid::POWER_MGMT
        | fid::TEMP_THRESHOLD
        | fid::ERROR_RECOVERY
        | fid::IRQ_COALESCING
        | fid::IRQ_VECTOR_CONFIG
        | fid::WRITE_ATOMICITY => {
            st.feat.insert(fid, sqe.cdw11);
            Done::ok()
        }
        _ => invalid_field(),
    }
}

pub fn get_features(c: &Ctrl, sqe: &Sqe) -> Done {
    let fid = sqe.cdw10 as u8;
    let sel = (sqe.cdw10 >> 8) & 7;
    let disc = c.is_discovery();
    let st = lock(&c.state);
    if sel == 3 {
        // Supported capabilities: changeable where Set Features works.
        return Done::dw0(match fid {
            fid::KEEP_ALIVE_TIMER | fid::ASYNC_EVENT_CONFIG | fid::NUMBER_OF_QUEUES => 0b100,
            _ => 0,
        });
    }
    match fid {
        fid::KEEP_ALIVE_TIMER => Done::dw0(c.kato_ms.load(Ordering::Acquire)),
        fid::ASYNC_EVENT_CONFIG => Done::dw0(st.aec),
        _ if disc => invalid_field(),
        fid::NUMBER_OF_QUEUES => {
            let n = st.num_io_queues.max(1);
            Done::dw0((n - 1) | ((n - 1) << 16))
        }
        fid::VOLATILE_WRITE_CACHE => Done::dw0(1),
        fid::HOST_IDENTIFIER => {
            if sqe.cdw11 & 1 == 0 {
                return invalid_field();
            }
            Done::data(c.hostid.to_vec())
        }
        fid::TEMP_THRESHOLD => Done::dw0(st.feat.get(&fid).copied().unwrap_or(0x157)),
        fid::ARBITRATION
        | fid::POWER_MGMT
        | fid::ERROR_RECOVERY
        | fid::IRQ_COALESCING
        | fid::IRQ_VECTOR_CONFIG
        | fid::WRITE_ATOMICITY => Done::dw0(st.feat.get(&fid).copied().unwrap_or(0)),
        _ => invalid_field(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::test_ctrl;

    fn sqe(opc: u8, nsid: u32, cdw10: u32, cdw11: u32) -> Sqe {
        Sqe {
            opc,
            nsid,
            cdw10,
            cdw11,
            ..Default::default()
        }
    }

    fn prop_set(c: &Arc<Ctrl>, v: u32) -> (Done, CcAction) {
        property_set(
            c,
            &Sqe {
                cdw11: prop::CC,
                cdw12: v,
                ..sqe(fabrics::OPCODE, 0, 0, 0)
            },
        )
    }

    fn csts(c: &Ctrl) -> u32 {
        let o = TransportOpts::default();
        property_get(c, &o, &sqe(fabrics::OPCODE, 0, 0, prop::CSTS)).dw0
    }

    #[test]
    fn properties_enable_reset_shutdown() {
        let c = test_ctrl(false);
        let o = TransportOpts::default();
        let cap = property_get(&c, &o, &sqe(0x7F, 0, 1, prop::CAP));
        let v = cap.dw0 as u64 | (cap.dw1 as u64) << 32;
        assert_eq!(v & 0xFFFF, 127);
        assert_eq!((v >> 24) & 0xFF, CAP_TO);
        assert_eq!((v >> 37) & 0xFF, 1);
        // 4-byte halves of CAP, VS.
        assert_eq!(
            property_get(&c, &o, &sqe(0x7F, 0, 0, prop::CAP + 4)).dw0,
            (v >> 32) as u32
        );
        assert_eq!(property_get(&c, &o, &sqe(0x7F, 0, 0, prop::VS)).dw0, VS);
        // Unknown offset / size / 8-byte CC: Invalid Field.
        assert_eq!(
            property_get(&c, &o, &sqe(0x7F, 0, 0, 0x40)).status,
            Status::generic(sc::INVALID_FIELD)
        );
        assert_eq!(
            property_get(&c, &o, &sqe(0x7F, 0, 2, prop::VS)).status,
            Status::generic(sc::INVALID_FIELD)
        );
        assert_eq!(
            property_get(&c, &o, &sqe(0x7F, 0, 1, prop::CC)).status,
            Status::generic(sc::INVALID_FIELD)
        );
        assert_eq!(prop_set(&c, 0x0046_0000).1, CcAction::None);
        assert_eq!(csts(&c), 0);
        prop_set(&c, 0x0046_0001);
        assert_eq!(csts(&c), 1);
        assert!(c.ready.load(Ordering::Acquire));
        // EN 1 -> 0: RDY clears, I/O queues go.
        assert_eq!(prop_set(&c, 0x0046_0000).1, CcAction::CloseIoQueues);
        assert_eq!(csts(&c), 0);
        prop_set(&c, 0x0046_0001);
        // Shutdown: SHST = complete.
        assert_eq!(prop_set(&c, 0x0046_4001).1, CcAction::CloseIoQueues);
        assert_eq!((csts(&c) >> 2) & 3, 2);
        assert!(!c.ready.load(Ordering::Acquire));
        prop_set(&c, 0x0046_0001);
        assert_eq!((csts(&c) >> 2) & 3, 0);
        // Bad IOSQES on enable: CFS.
        let c = test_ctrl(false);
        prop_set(&c, 0x0036_0001);
        assert_eq!(csts(&c) & 3, 2);
    }

    #[test]
    fn identify_controller_fields() {
        let c = test_ctrl(false);
        let o = TransportOpts::default();
        let b = identify_ctrl(&c, &o);
        use id_ctrl::*;
        assert_eq!(&b[SN..SN + 20], b"FUZZ                ");
        assert_eq!(u16::from_le_bytes([b[CNTLID], b[CNTLID + 1]]), 1);
        assert_eq!(b[MDTS], 5);
        assert_eq!((b[SQES], b[CQES], b[CNTRLTYPE]), (0x66, 0x44, 1));
        assert_eq!(u16::from_le_bytes([b[KAS], b[KAS + 1]]), 10);
        assert_eq!(u16::from_le_bytes([b[MAXCMD], b[MAXCMD + 1]]), 128);
        assert_eq!(
            u32::from_le_bytes(b[IOCCSZ..IOCCSZ + 4].try_into().unwrap()),
            260
        );
        assert_eq!(
            u32::from_le_bytes(b[SGLS..SGLS + 4].try_into().unwrap()),
            0x0010_0001
        );
        assert_eq!(u16::from_le_bytes([b[ONCS], b[ONCS + 1]]), 0x0C);
        assert_eq!(b[ICDOFF], 0);
        let d = identify_ctrl(&test_ctrl(true), &o);
        assert_eq!(d[CNTRLTYPE], 2);
        assert_eq!(
            &d[SUBNQN..SUBNQN + DISCOVERY_NQN.len()],
            DISCOVERY_NQN.as_bytes()
        );
        // (controller, NSID, CNS, status): a discovery controller has only
        // CNS 01h; an unknown CNS is Invalid Field; a bad NSID Invalid
        // Namespace.
        let disc = test_ctrl(true);
        let bad_ns = sc::INVALID_NAMESPACE_OR_FORMAT;
        for (ctrl, nsid, cns, want) in [
            (&disc, 0, 2, sc::INVALID_FIELD),
            (&c, 0, 0x1C, sc::INVALID_FIELD),
            (&c, 0, 0, bad_ns),
            (&c, 0xFFFF_FFFF, 0, bad_ns),
            (&c, 5, 3, bad_ns),
        ] {
            assert_eq!(
                identify(ctrl, &o, &sqe(6, nsid, cns, 0)).status,
                Status::generic(want),
                "Identify NSID {nsid:#x} CNS {cns:#x} on cntrltype {}",
                if ctrl.is_discovery() { 2 } else { 1 }
            );
        }
        // An inactive NSID and the active NSID list: zeroes.
        for (nsid, cns) in [(5, 0), (0, 2)] {
            assert_eq!(
                identify(&c, &o, &sqe(6, nsid, cns, 0)).data,
                Some(vec![0u8; 4096]),
                "Identify NSID {nsid} CNS {cns}"
            );
        }
    }

    fn log(lid: u8, len: u32, lpo: u64, rae: bool) -> Sqe {
        let numd = len / 4 - 1;
        Sqe {
            cdw12: lpo as u32,
            cdw13: (lpo >> 32) as u32,
            ..sqe(
                2,
                0xFFFF_FFFF,
                lid as u32 | (rae as u32) << 15 | (numd & 0xFFFF) << 16,
                numd >> 16,
            )
        }
    }

    #[test]
    fn log_pages_offsets_and_errors() {
        let c = test_ctrl(false);
        let smart = get_log_page(&c, &log(lid::SMART, 512, 0, false), "", 4096);
        assert_eq!(smart.data.as_ref().unwrap()[3], 100);
        // Partial read with an offset; past the end zero-filled.
        let part = get_log_page(&c, &log(lid::SMART, 8, 0, false), "", 4096)
            .data
            .unwrap();
        assert_eq!(part.len(), 8);
        let tail = get_log_page(&c, &log(lid::SMART, 16, 504, false), "", 4096)
            .data
            .unwrap();
        assert_eq!(&tail[8..], &[0u8; 8]);
        // (log, length, offset, transfer size, status): an offset at or
        // past the end or not dword aligned, an unknown log, the discovery
        // log on an I/O controller, a log longer than the transfer.
        let bad_field = Status::generic(sc::INVALID_FIELD);
        let bad_log = Status::specific(csc::INVALID_LOG_PAGE);
        for (lid, len, lpo, xfer, want) in [
            (lid::SMART, 8, 512, 4096, bad_field),
            (lid::SMART, 8, 2, 4096, bad_field),
            (0x42, 8, 0, 4096, bad_log),
            (lid::DISCOVERY, 8, 0, 4096, bad_log),
            (lid::SMART, 512, 0, 256, bad_field),
        ] {
            assert_eq!(
                get_log_page(&c, &log(lid, len, lpo, false), "", xfer).status,
                want,
                "log {lid:#x}, {len} bytes at {lpo}, transfer {xfer}"
            );
        }
        // Changed NS list: cleared by a read without RAE.
        {
            let mut st = lock(&c.state);
            st.changed_ns = vec![3, 7];
            st.masked.push(aen::NS_CHANGED);
        }
        let p = get_log_page(&c, &log(lid::CHANGED_NS, 4096, 0, true), "", 4096)
            .data
            .unwrap();
        assert_eq!(&p[..12], &[3, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(lock(&c.state).changed_ns, vec![3, 7]);
        get_log_page(&c, &log(lid::CHANGED_NS, 4096, 0, false), "", 4096);
        assert!(lock(&c.state).changed_ns.is_empty());
        assert!(lock(&c.state).masked.is_empty());
        // Discovery log header on a discovery controller.
        let d = test_ctrl(true);
        let h = get_log_page(&d, &log(lid::DISCOVERY, 20, 0, false), "10.0.0.1", 4096)
            .data
            .unwrap();
        assert_eq!(h.len(), 20);
        assert_eq!(u16::from_le_bytes([h[16], h[17]]), 0);
    }

    #[test]
    fn features() {
        let c = test_ctrl(false);
        let o = TransportOpts::default();
        let f = |fid: u8, v: u32| set_features(&c, &o, &sqe(9, 0, fid as u32, v));
        assert_eq!(f(fid::NUMBER_OF_QUEUES, 0x0003_0007).dw0, 0x0007_0007);
        assert_eq!(
            get_features(&c, &sqe(10, 0, fid::NUMBER_OF_QUEUES as u32, 0)).dw0,
            0x0007_0007
        );
        assert_eq!(
            f(fid::NUMBER_OF_QUEUES, 0xFFFF).status,
            Status::generic(sc::INVALID_FIELD)
        );
        assert_eq!(f(fid::NUMBER_OF_QUEUES, 0x0400_0400).dw0, 126 | 126 << 16);
        assert_eq!(
            f(fid::KEEP_ALIVE_TIMER, 0).status,
            Status::generic(sc::KEEP_ALIVE_INVALID)
        );
        assert!(f(fid::KEEP_ALIVE_TIMER, 1500).status.is_success());
        assert_eq!(
            get_features(&c, &sqe(10, 0, fid::KEEP_ALIVE_TIMER as u32, 0)).dw0,
            2000
        );
        assert!(f(fid::ASYNC_EVENT_CONFIG, aen::CFG_NS_ATTR)
            .status
            .is_success());
        assert_eq!(
            get_features(&c, &sqe(10, 0, fid::ASYNC_EVENT_CONFIG as u32, 0)).dw0,
            aen::CFG_NS_ATTR
        );
        assert_eq!(
            set_features(&c, &o, &sqe(9, 0, 1 << 31 | 7, 0)).status,
            Status::specific(csc::FEATURE_NOT_SAVEABLE)
        );
        assert_eq!(f(0x42, 0).status, Status::generic(sc::INVALID_FIELD));
        assert_eq!(
            get_features(&c, &sqe(10, 0, fid::HOST_IDENTIFIER as u32, 1)).data,
            Some(vec![0; 16])
        );
        assert_eq!(
            get_features(&c, &sqe(10, 0, fid::VOLATILE_WRITE_CACHE as u32, 0)).dw0,
            1
        );
        // Discovery: only KATO and AEC.
        let d = test_ctrl(true);
        assert_eq!(
            set_features(&d, &o, &sqe(9, 0, 7, 0)).status,
            Status::generic(sc::INVALID_FIELD)
        );
        assert!(
            set_features(&d, &o, &sqe(9, 0, fid::KEEP_ALIVE_TIMER as u32, 10000))
                .status
                .is_success()
        );
    }
}
