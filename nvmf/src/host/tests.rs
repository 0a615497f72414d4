//! Host tests against a scripted controller: a small NVMe/TCP controller on
//! blocking sockets in test threads, built on the crate's PDU codec, that
//! serves a RAM namespace and can be told to break the protocol in chosen
//! ways (bad CID, short data, corrupt header digest, wrong data offset,
//! TermReq, dropped connection). The end-to-end tests against the real
//! target are in test/test_nvmf_host.py.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bdev::util::{self, run_on_reactor};
use bdev::{IoStatus, IoType};
use reactor::DmaBuf;

use super::ctrlr::{self, AttachOpts};
use crate::pdu::{Accept, Decoder, DecoderConfig, Encoder, Fes, IcResp, Pdu, PduType, R2t, IC_LEN};
use crate::spec::{self, id_ctrl, id_ns, Cqe, Sqe, Status};

const NQN: &str = "nqn.2016-06.io.spdk:scripted";
const BS: usize = 512;
const BLOCKS: usize = 8192;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    /// CapsuleResp of the first read names a CID that is not outstanding.
    BadCid,
    /// The first read completes successfully with half its data.
    ShortRead,
    /// The first read's CapsuleResp carries a corrupt header digest.
    BadHdgst,
    /// The first read's C2HData starts at the wrong offset.
    WrongDatao,
    /// The first read is answered with a C2HTermReq.
    TermReq,
    /// The first read's data digest is wrong (not fatal: the command fails).
    BadDdgst,
    /// The first read's C2HData has HLEN 30.
    BadHlen,
    /// The first read is answered with a PDU of type 0x08 (unused).
    UnknownType,
    /// The first R2T asks for more than the write carries.
    BadR2t,
    /// The first read is answered in full and the connection closed at
    /// once: its data, response and FIN reach the host together (as from a
    /// target that finishes its I/O while shutting down).
    AnswerThenClose,
}

struct Ctl {
    disk: Mutex<Vec<u8>>,
    fault: Fault,
    fault_done: AtomicBool,
    /// Admin connects seen (one per (re)connect of the controller).
    admin_connects: AtomicU32,
    /// FES of H2CTermReqs received.
    terms: Mutex<Vec<u16>>,
    shutdown_seen: AtomicBool,
    maxh2cdata: u32,
    ioccsz: u32,
    mdts: u8,
    /// Refuse every connection (the "target is down").
    down: AtomicBool,
    /// Commands seen, by opcode, on I/O queues.
    ops: Mutex<Vec<(u8, u32)>>,
    /// AnswerThenClose: close the connection after the answer being sent.
    close_now: AtomicBool,
}

fn start_ctl(fault: Fault, maxh2cdata: u32, ioccsz: u32, mdts: u8) -> (u16, Arc<Ctl>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let ctl = Arc::new(Ctl {
        disk: Mutex::new(initial(0, BLOCKS)),
        fault,
        fault_done: AtomicBool::new(false),
        admin_connects: AtomicU32::new(0),
        terms: Mutex::new(Vec::new()),
        shutdown_seen: AtomicBool::new(false),
        maxh2cdata,
        ioccsz,
        mdts,
        down: AtomicBool::new(false),
        ops: Mutex::new(Vec::new()),
        close_now: AtomicBool::new(false),
    });
    let c = ctl.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { break };
            if c.down.load(Ordering::SeqCst) {
                drop(s);
                continue;
            }
            let c = c.clone();
            std::thread::spawn(move || {
                let _ = serve(s, &c);
            });
        }
    });
    (port, ctl)
}

fn read_pdu(s: &mut TcpStream, dec: &Decoder, buf: &mut Vec<u8>) -> std::io::Result<Option<usize>> {
    loop {
        match dec.decode(buf) {
            Ok(Some(d)) => return Ok(Some(d.len)),
            Ok(None) => {}
            Err(e) => panic!("host sent a bad PDU: {e}"),
        }
        let mut tmp = [0u8; 65536];
        let n = s.read(&mut tmp)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn resp(enc: &Encoder, out: &mut Vec<u8>, cid: u16, st: Status, dw0: u32) {
    enc.capsule_resp(
        out,
        &Cqe {
            dw0,
            cid,
            status: st,
            ..Cqe::default()
        },
    );
}

fn serve(mut s: TcpStream, c: &Ctl) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut ic = [0u8; IC_LEN];
    s.read_exact(&mut ic)?;
    assert_eq!(ic[0], PduType::IcReq as u8);
    let dgst = ic[11];
    let mut out = Vec::new();
    Encoder::icresp(
        &mut out,
        &IcResp {
            pfv: 0,
            cpda: 0,
            dgst,
            maxh2cdata: c.maxh2cdata,
        },
    );
    s.write_all(&out)?;
    let (hd, dd) = (dgst & 1 != 0, dgst & 2 != 0);
    let enc = Encoder {
        hdgst: hd,
        ddgst: dd,
        tx_pda: 0,
    };
    let dec = Decoder::new(DecoderConfig {
        accept: Accept::HostToCtrl,
        hdgst: hd,
        ddgst: dd,
        rx_pda: 0,
        max_icd: 8192,
        max_data: c.maxh2cdata,
    });
    let mut buf = Vec::new();
    let mut cc = 0u32;
    let mut qid = 0u16;
    // Writes waiting for their H2CData: cid -> (slba, len, data).
    let mut pending: std::collections::HashMap<u16, (u64, usize, Vec<u8>)> = Default::default();
    loop {
        let Some(len) = read_pdu(&mut s, &dec, &mut buf)? else {
            return Ok(());
        };
        let d = dec.decode(&buf).unwrap().unwrap();
        out.clear();
        match d.pdu {
            Pdu::H2CTermReq(t, _) => {
                c.terms.lock().unwrap().push(t.fes);
                return Ok(());
            }
            Pdu::H2CData(h, data) => {
                let e = pending
                    .get_mut(&h.cccid)
                    .expect("H2CData for a pending write");
                assert_eq!(h.datao as usize, e.2.len(), "H2CData in order");
                assert!(h.datal <= c.maxh2cdata);
                e.2.extend_from_slice(data);
                if e.2.len() == e.1 {
                    assert!(h.last);
                    let (slba, _, data) = pending.remove(&h.cccid).unwrap();
                    let off = slba as usize * BS;
                    c.disk.lock().unwrap()[off..off + data.len()].copy_from_slice(&data);
                    resp(&enc, &mut out, h.cccid, Status::SUCCESS, 0);
                }
            }
            Pdu::CapsuleCmd(sqe, icd) => {
                let icd = icd.to_vec();
                handle_cmd(
                    c,
                    &enc,
                    &mut out,
                    &sqe,
                    &icd,
                    &mut cc,
                    &mut qid,
                    &mut pending,
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        buf.drain(..len);
        if c.fault == Fault::AnswerThenClose && c.close_now.swap(false, Ordering::SeqCst) {
            // Corked, the answer waits in the socket until the shutdown,
            // whose FIN then leaves in the same segment: the host cannot
            // receive one without the other.
            let on: libc::c_int = 1;
            // SAFETY: a valid socket and option of the size given.
            let r = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::IPPROTO_TCP,
                    libc::TCP_CORK,
                    &on as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0, "TCP_CORK");
            s.write_all(&out)?;
            s.shutdown(std::net::Shutdown::Write)?;
            return Ok(());
        }
        if !out.is_empty() {
            s.write_all(&out)?;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn handle_cmd(
    c: &Ctl,
    enc: &Encoder,
    out: &mut Vec<u8>,
    sqe: &Sqe,
    icd: &[u8],
    cc: &mut u32,
    qid: &mut u16,
    pending: &mut std::collections::HashMap<u16, (u64, usize, Vec<u8>)>,
) {
    let ok = Status::SUCCESS;
    let cid = sqe.cid;
    if sqe.opc == spec::fabrics::OPCODE {
        match sqe.fctype() {
            spec::fabrics::CONNECT => {
                let cmd = spec::ConnectCmd::from_sqe(sqe);
                *qid = cmd.qid;
                let data = spec::ConnectData::parse(icd).unwrap();
                assert_eq!(data.subnqn, NQN);
                if cmd.qid == 0 {
                    assert_eq!(data.cntlid, 0xFFFF);
                    c.admin_connects.fetch_add(1, Ordering::SeqCst);
                }
                resp(enc, out, cid, ok, 1);
            }
            spec::fabrics::PROPERTY_GET => {
                let v: u64 = match sqe.cdw11 {
                    spec::prop::CAP => 127 | (1 << 16) | (15 << 24) | (1 << 37),
                    spec::prop::VS => 0x10400,
                    spec::prop::CC => *cc as u64,
                    spec::prop::CSTS => {
                        let mut v = (*cc & 1) as u64;
                        if (*cc >> 14) & 3 != 0 {
                            v |= 2 << 2;
                        }
                        v
                    }
                    _ => 0,
                };
                enc.capsule_resp(
                    out,
                    &Cqe {
                        dw0: v as u32,
                        dw1: (v >> 32) as u32,
                        cid,
                        ..Cqe::default()
                    },
                );
            }
            spec::fabrics::PROPERTY_SET => {
                *cc = sqe.cdw12;
                if (*cc >> 14) & 3 != 0 {
                    c.shutdown_seen.store(true, Ordering::SeqCst);
                }
                resp(enc, out, cid, ok, 0);
            }
            _ => resp(enc, out, cid, Status::generic(spec::sc::INVALID_OPCODE), 0),
        }
        return;
    }
    if *qid == 0 {
        match sqe.opc {
            spec::admin::IDENTIFY => {
                let mut b = vec![0u8; 4096];
                match sqe.cdw10 & 0xFF {
                    0x01 => {
                        b[id_ctrl::SN..id_ctrl::SN + 20].copy_from_slice(b"SCRIPTED0001        ");
                        b[id_ctrl::MN..id_ctrl::MN + 40].fill(b' ');
                        b[id_ctrl::MN..id_ctrl::MN + 8].copy_from_slice(b"Scripted");
                        b[id_ctrl::MDTS] = c.mdts;
                        b[id_ctrl::CNTLID] = 1;
                        b[id_ctrl::VER..id_ctrl::VER + 4]
                            .copy_from_slice(&0x10400u32.to_le_bytes());
                        b[id_ctrl::KAS] = 10;
                        b[id_ctrl::NN] = 1;
                        b[id_ctrl::ONCS] = 0x0C;
                        b[id_ctrl::VWC] = 1;
                        b[id_ctrl::SUBNQN..id_ctrl::SUBNQN + NQN.len()]
                            .copy_from_slice(NQN.as_bytes());
                        b[id_ctrl::IOCCSZ..id_ctrl::IOCCSZ + 4]
                            .copy_from_slice(&c.ioccsz.to_le_bytes());
                        b[id_ctrl::IORCSZ] = 1;
                    }
                    0x02 => b[0] = 1,
                    0x00 => {
                        b[id_ns::NSZE..id_ns::NSZE + 8]
                            .copy_from_slice(&(BLOCKS as u64).to_le_bytes());
                        b[id_ns::NCAP..id_ns::NCAP + 8]
                            .copy_from_slice(&(BLOCKS as u64).to_le_bytes());
                        b[id_ns::LBAF0 + 2] = 9;
                    }
                    0x03 => {
                        b[0] = spec::nidt::UUID;
                        b[1] = 16;
                        b[4..20].copy_from_slice(&[0x11; 16]);
                    }
                    _ => {
                        resp(enc, out, cid, Status::generic(spec::sc::INVALID_FIELD), 0);
                        return;
                    }
                }
                enc.data_pdu(
                    out,
                    true,
                    &crate::pdu::DataHdr {
                        cccid: cid,
                        datal: 4096,
                        last: true,
                        ..Default::default()
                    },
                    &b,
                );
                resp(enc, out, cid, ok, 0);
            }
            spec::admin::SET_FEATURES => resp(enc, out, cid, ok, sqe.cdw11),
            spec::admin::KEEP_ALIVE => resp(enc, out, cid, ok, 0),
            _ => resp(enc, out, cid, Status::generic(spec::sc::INVALID_OPCODE), 0),
        }
        return;
    }
    c.ops.lock().unwrap().push((sqe.opc, sqe.nlb()));
    let slba = sqe.slba();
    let nlb = sqe.nlb() as usize;
    let off = slba as usize * BS;
    match sqe.opc {
        spec::nvm::READ => {
            let fault = if c.fault != Fault::None
                && c.fault != Fault::BadR2t
                && !c.fault_done.swap(true, Ordering::SeqCst)
            {
                c.fault
            } else {
                Fault::None
            };
            let data = c.disk.lock().unwrap()[off..off + nlb * BS].to_vec();
            let half = data.len() / 2;
            let dh = |datao: usize, n: usize, last: bool| crate::pdu::DataHdr {
                cccid: cid,
                datao: datao as u32,
                datal: n as u32,
                last,
                ..Default::default()
            };
            match fault {
                Fault::AnswerThenClose => c.close_now.store(true, Ordering::SeqCst),
                Fault::TermReq => {
                    Encoder::term_req(out, true, Fes::InvalidHeaderField, 2, &[0u8; 24]);
                    return;
                }
                Fault::ShortRead => {
                    enc.data_pdu(out, true, &dh(0, half, true), &data[..half]);
                    resp(enc, out, cid, ok, 0);
                    return;
                }
                Fault::WrongDatao => {
                    enc.data_pdu(out, true, &dh(512, half, false), &data[..half]);
                    return;
                }
                Fault::UnknownType => {
                    let s = out.len();
                    resp(enc, out, cid, ok, 0);
                    out[s] = 0x08;
                    return;
                }
                Fault::BadHlen => {
                    let s = out.len();
                    enc.data_pdu(out, true, &dh(0, data.len(), true), &data);
                    out[s + 2] = 30;
                    return;
                }
                Fault::BadDdgst => {
                    let s = out.len();
                    enc.data_pdu(out, true, &dh(0, data.len(), true), &data);
                    let l = out.len();
                    out[l - 1] ^= 0xFF;
                    let _ = s;
                    resp(enc, out, cid, ok, 0);
                    return;
                }
                _ => {}
            }
            // Two PDUs when there is enough data, to exercise reassembly.
            if data.len() >= 1024 {
                enc.data_pdu(out, true, &dh(0, half, false), &data[..half]);
                enc.data_pdu(out, true, &dh(half, data.len() - half, true), &data[half..]);
            } else {
                enc.data_pdu(out, true, &dh(0, data.len(), true), &data);
            }
            match fault {
                Fault::BadCid => resp(enc, out, cid.wrapping_add(77), ok, 0),
                Fault::BadHdgst => {
                    let s = out.len();
                    resp(enc, out, cid, ok, 0);
                    if enc.hdgst {
                        out[s + 24] ^= 0xFF;
                    } else {
                        out[s + 2] = 25;
                    }
                }
                _ => resp(enc, out, cid, ok, 0),
            }
        }
        spec::nvm::WRITE => {
            let len = nlb * BS;
            if sqe.sgl.kind == spec::Sgl::DATA_BLOCK_OFFSET {
                assert_eq!(icd.len(), len);
                c.disk.lock().unwrap()[off..off + len].copy_from_slice(icd);
                resp(enc, out, cid, ok, 0);
            } else {
                pending.insert(cid, (slba, len, Vec::with_capacity(len)));
                // BadR2t: once, an R2T for more than the command's data.
                let bad = c.fault == Fault::BadR2t && !c.fault_done.swap(true, Ordering::SeqCst);
                enc.r2t(
                    out,
                    &R2t {
                        cccid: cid,
                        ttag: 1,
                        r2to: 0,
                        r2tl: len as u32 + if bad { 512 } else { 0 },
                    },
                );
            }
        }
        spec::nvm::WRITE_ZEROES => {
            c.disk.lock().unwrap()[off..off + nlb * BS].fill(0);
            resp(enc, out, cid, ok, 0);
        }
        spec::nvm::DATASET_MANAGEMENT => {
            let data = if sqe.sgl.kind == spec::Sgl::DATA_BLOCK_OFFSET {
                icd.to_vec()
            } else {
                panic!("DSM ranges expected in-capsule in these tests");
            };
            assert_eq!(sqe.cdw11 & 4, 4);
            let n = u32::from_le_bytes(data[4..8].try_into().unwrap()) as usize;
            let s = u64::from_le_bytes(data[8..16].try_into().unwrap()) as usize;
            c.disk.lock().unwrap()[s * BS..(s + n) * BS].fill(0);
            resp(enc, out, cid, ok, 0);
        }
        spec::nvm::FLUSH => resp(enc, out, cid, ok, 0),
        _ => resp(enc, out, cid, Status::generic(spec::sc::INVALID_OPCODE), 0),
    }
}

fn opts(port: u16, hd: bool, dd: bool) -> AttachOpts {
    AttachOpts {
        name: "T0".into(),
        traddr: "127.0.0.1".into(),
        trsvcid: port.to_string(),
        adrfam: "IPv4".into(),
        subnqn: NQN.into(),
        hostnqn: "nqn.2014-08.org.nvmexpress:uuid:test".into(),
        hdgst: hd,
        ddgst: dd,
        num_io_queues: 8,
        ctrlr_loss_timeout_sec: 0,
        reconnect_delay_sec: 0,
        fast_io_fail_timeout_sec: 0,
        connect_timeout: Duration::from_secs(5),
        kato_ms: 10_000,
    }
}

/// `opts` that reconnect every second, giving up after `loss_sec`.
fn reconnecting(port: u16, hd: bool, dd: bool, loss_sec: i32) -> AttachOpts {
    AttachOpts {
        ctrlr_loss_timeout_sec: loss_sec,
        reconnect_delay_sec: 1,
        ..opts(port, hd, dd)
    }
}

/// Attach `o` and open its namespace bdev (T0n1) for writing.
async fn attach_open(o: AttachOpts) -> (bdev::Desc, bdev::IoChannel) {
    ctrlr::attach(o).await.unwrap();
    let desc = bdev::open("T0n1", true, |_| {}).unwrap();
    let ch = desc.channel();
    (desc, ch)
}

/// Close the channel and descriptor, then detach the controller.
async fn close_detach(desc: bdev::Desc, ch: bdev::IoChannel) {
    drop(ch);
    drop(desc);
    ctrlr::detach("T0").await.unwrap();
}

/// Poll `done` every 50 ms until it holds or `secs` seconds have passed
/// (the caller asserts what it expects afterwards).
async fn wait_until(secs: u64, mut done: impl FnMut() -> bool) {
    let t0 = reactor::now_ns();
    while !done() && reactor::now_ns() - t0 < secs * 1_000_000_000 {
        reactor::sleep(Duration::from_millis(50)).await;
    }
}

/// The scripted disk's initial bytes of `count` blocks from block `first`.
fn initial(first: usize, count: usize) -> Vec<u8> {
    (first * BS..(first + count) * BS)
        .map(|i| (i % 251) as u8)
        .collect()
}

fn pattern(seed: u8, len: usize) -> DmaBuf {
    let mut b = DmaBuf::new(len);
    for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    b
}

async fn io_roundtrip(ctl: &Arc<Ctl>) {
    let desc = bdev::open("T0n1", true, |_| {}).unwrap();
    let b = desc.bdev().clone();
    assert_eq!(b.product_name(), "NVMe disk");
    assert_eq!((b.block_size(), b.num_blocks()), (512, BLOCKS as u64));
    assert_eq!(b.uuid().as_bytes(), &[0x11; 16]);
    let ch = desc.channel();
    // Sizes around the in-capsule limit, MAXH2CDATA and MDTS; odd offsets.
    for (i, &(off, blocks)) in [
        (0u64, 1u64),
        (7, 3),
        (100, 8),
        (1000, 9),
        (2001, 64),
        (3000, 257),
        (5000, 1000),
    ]
    .iter()
    .enumerate()
    {
        let len = blocks as usize * BS;
        let w = pattern(i as u8, len);
        let expect = w.as_slice().to_vec();
        util::write(&ch, off, w, i % 2 == 1).await.unwrap();
        let r = util::read(&ch, off, blocks).await.unwrap();
        assert!(r.as_slice()[..len] == expect[..], "data at {off}+{blocks}");
        let disk = ctl.disk.lock().unwrap();
        assert!(disk[off as usize * BS..off as usize * BS + len] == expect[..]);
    }
    util::simple(&ch, IoType::Unmap, 0, 8).await.unwrap();
    util::simple(&ch, IoType::WriteZeroes, 100, 8)
        .await
        .unwrap();
    util::simple(&ch, IoType::Flush, 0, 0).await.unwrap();
    let r = util::read(&ch, 0, 8).await.unwrap();
    assert!(r.as_slice()[..4096].iter().all(|&x| x == 0));
    let r = util::read(&ch, 100, 8).await.unwrap();
    assert!(r.as_slice()[..4096].iter().all(|&x| x == 0));
    // Out of range fails without reaching the wire.
    assert!(util::read(&ch, BLOCKS as u64, 1).await.is_err());
    drop(ch);
    drop(desc);
}

#[test]
fn attach_io_detach_plain_and_digests() {
    for (hd, dd) in [(false, false), (true, true), (true, false)] {
        // MAXH2CDATA 8 KiB, 1 KiB of in-capsule data, MDTS 64 KiB.
        let (port, ctl) = start_ctl(Fault::None, 8192, (1024 + 64) / 16, 4);
        let c2 = ctl.clone();
        run_on_reactor(0x1, move || async move {
            let names = ctrlr::attach(opts(port, hd, dd)).await.unwrap();
            assert_eq!(names, vec!["T0n1".to_string()]);
            let c = ctrlr::find("T0").unwrap();
            assert_eq!(c.digests(), (hd, dd));
            // A second attach under the same name is refused.
            let e = ctrlr::attach(opts(port, hd, dd)).await.unwrap_err();
            assert!(e.to_string().contains("already exists"), "{e}");
            io_roundtrip(&c2).await;
            ctrlr::detach("T0").await.unwrap();
            assert!(bdev::get("T0n1").is_none());
            assert!(ctrlr::find("T0").is_none());
        });
        assert!(ctl.shutdown_seen.load(Ordering::SeqCst));
        let ops = ctl.ops.lock().unwrap();
        // 1000 blocks split at MDTS (128 blocks): no command above it.
        assert!(ops.iter().all(|&(_, n)| n <= 128 || ops.is_empty()));
        assert!(ops.iter().any(|&(o, _)| o == spec::nvm::DATASET_MANAGEMENT));
    }
}

#[test]
fn attach_refused_and_unreachable() {
    // Nothing listens: a clear connect error.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    run_on_reactor(0x1, move || async move {
        let e = ctrlr::attach(opts(port, false, false)).await.unwrap_err();
        assert!(e.to_string().contains("cannot connect"), "{e}");
        assert!(ctrlr::find("T0").is_none());
    });
    // Wrong subsystem NQN: the scripted controller reports another NQN.
    let (port, _ctl) = start_ctl(Fault::None, 8192, 260, 5);
    run_on_reactor(0x1, move || async move {
        let mut o = opts(port, false, false);
        o.subnqn = "nqn.other".into();
        // The scripted controller asserts on the NQN and drops the link.
        let e = ctrlr::attach(o).await.unwrap_err();
        assert!(!e.to_string().is_empty());
        assert!(ctrlr::find("T0").is_none());
    });
}

/// Each malformed answer fails the connection (never a panic), the host
/// reconnects, and the I/O is retried and returns the right data.
#[test]
fn malformed_pdus_fail_the_connection_and_recover() {
    for fault in [
        Fault::BadCid,
        Fault::ShortRead,
        Fault::BadHdgst,
        Fault::WrongDatao,
        Fault::TermReq,
        Fault::BadHlen,
        Fault::UnknownType,
        Fault::BadR2t,
    ] {
        let (port, ctl) = start_ctl(fault, 8192, 260, 5);
        let c2 = ctl.clone();
        run_on_reactor(0x1, move || async move {
            let (desc, ch) = attach_open(reconnecting(port, true, true, 5)).await;
            if fault == Fault::BadR2t {
                // 16 blocks = 8 KiB, beyond the 4 KiB in-capsule limit.
                let w = pattern(9, 16 * BS);
                let expect = w.as_slice().to_vec();
                util::write(&ch, 200, w, false).await.unwrap();
                let r = util::read(&ch, 200, 16).await.unwrap();
                assert!(r.as_slice()[..16 * BS] == expect[..]);
            }
            let r = util::read(&ch, 10, 4).await;
            let r = r.unwrap_or_else(|e| panic!("{fault:?}: read failed after reconnect: {e:?}"));
            assert!(r.as_slice()[..2048] == initial(10, 4)[..], "{fault:?}");
            assert!(
                c2.admin_connects.load(Ordering::SeqCst) >= 2,
                "{fault:?}: no reconnect"
            );
            close_detach(desc, ch).await;
        });
        let terms = ctl.terms.lock().unwrap().clone();
        match fault {
            Fault::BadHdgst => assert!(
                terms.contains(&(Fes::HeaderDigestError as u16)),
                "{terms:?}"
            ),
            Fault::WrongDatao | Fault::BadR2t => {
                assert!(terms.contains(&(Fes::DataOutOfRange as u16)), "{terms:?}")
            }
            Fault::BadHlen | Fault::UnknownType => assert!(
                terms.contains(&(Fes::InvalidHeaderField as u16)),
                "{terms:?}"
            ),
            _ => {}
        }
    }
}

/// A data digest error fails only that command (retryable status).
#[test]
fn data_digest_error_fails_the_command() {
    let (port, _ctl) = start_ctl(Fault::BadDdgst, 8192, 260, 5);
    run_on_reactor(0x1, move || async move {
        let (desc, ch) = attach_open(opts(port, false, true)).await;
        let e = util::read(&ch, 0, 8).await.unwrap_err();
        assert_eq!(
            e,
            IoStatus::NvmeError {
                sct: 0,
                sc: spec::sc::DATA_TRANSFER_ERROR
            }
        );
        // The connection is still good.
        util::read(&ch, 0, 8).await.unwrap();
        assert_eq!(ctrlr::find("T0").unwrap().state_name(), "enabled");
        close_detach(desc, ch).await;
    });
}

/// Target down: I/O waits while reconnecting, fails fast after
/// fast_io_fail_timeout_sec, works again once the target is back; with the
/// target gone past ctrlr_loss_timeout_sec the controller and bdev go.
#[test]
fn reconnect_fast_fail_and_loss() {
    let (port, ctl) = start_ctl(Fault::None, 8192, 260, 5);
    let c2 = ctl.clone();
    run_on_reactor(0x1, move || async move {
        let o = AttachOpts {
            fast_io_fail_timeout_sec: 2,
            ..reconnecting(port, false, false, 6)
        };
        let (desc, ch) = attach_open(o).await;
        util::read(&ch, 0, 1).await.unwrap();
        // Take the target down and break the connections.
        c2.down.store(true, Ordering::SeqCst);
        let c = ctrlr::find("T0").unwrap();
        ctrlr::ctrlr_failed(c.shared.id);
        let t0 = reactor::now_ns();
        wait_until(8, || c.shared.state() == ctrlr::ST_FAIL_FAST).await;
        // Not before fast_io_fail_timeout_sec.
        assert!(reactor::now_ns() - t0 >= 1_900_000_000);
        assert_eq!(c.shared.state(), ctrlr::ST_FAIL_FAST);
        let t0 = reactor::now_ns();
        assert!(util::read(&ch, 0, 1).await.is_err());
        assert!(reactor::now_ns() - t0 < 500_000_000, "fail fast");
        // Back up: the next reconnect attempt succeeds and I/O works.
        c2.down.store(false, Ordering::SeqCst);
        wait_until(8, || c.state_name() == "enabled").await;
        assert_eq!(c.state_name(), "enabled");
        util::read(&ch, 0, 1).await.unwrap();
        // Down for good: past ctrlr_loss_timeout_sec the bdev is deleted.
        c2.down.store(true, Ordering::SeqCst);
        ctrlr::ctrlr_failed(c.shared.id);
        drop(ch);
        drop(desc);
        wait_until(10, || ctrlr::find("T0").is_none()).await;
        assert!(ctrlr::find("T0").is_none());
        assert!(bdev::get("T0n1").is_none());
    });
}

/// A reset makes a new association; I/O submitted meanwhile waits and
/// completes after it.
#[test]
fn reset_reconnects_and_io_waits() {
    let (port, ctl) = start_ctl(Fault::None, 8192, 260, 5);
    let c2 = ctl.clone();
    run_on_reactor(0x1, move || async move {
        let (desc, ch) = attach_open(opts(port, false, false)).await;
        let (ch2, reset) = (ch.clone(), reactor::spawn_local(ctrlr::reset("T0")));
        // Submitted while the reset runs.
        let r = util::read(&ch2, 20, 2).await.unwrap();
        assert!(r.as_slice()[..1024] == initial(20, 2)[..]);
        reset.await.unwrap();
        assert_eq!(c2.admin_connects.load(Ordering::SeqCst), 2);
        assert!(matches!(
            ctrlr::reset("nope").await,
            Err(super::HostError::NotFound(_))
        ));
        util::read(&ch, 0, 1).await.unwrap();
        drop((ch, ch2, desc));
        ctrlr::detach("T0").await.unwrap();
    });
}

/// A read answered in full just before the connection closes completes
/// with its data: the host calls back what it received before it fails the
/// queue pair (an I/O left uncompleted holds its submitter's slot forever).
#[test]
fn answer_received_with_the_close_completes() {
    let (port, ctl) = start_ctl(Fault::AnswerThenClose, 8192, 260, 5);
    let c2 = ctl.clone();
    run_on_reactor(0x1, move || async move {
        let (desc, ch) = attach_open(reconnecting(port, false, false, 5)).await;
        let r = reactor::with_timeout(Duration::from_secs(10), util::read(&ch, 10, 4))
            .await
            .expect("the read answered before the close never completed")
            .unwrap();
        assert!(r.as_slice()[..2048] == initial(10, 4)[..]);
        assert!(
            c2.fault_done.load(Ordering::SeqCst),
            "the fault was not used"
        );
        // The lost connection is noticed and replaced.
        let c = ctrlr::find("T0").unwrap();
        wait_until(10, || {
            c2.admin_connects.load(Ordering::SeqCst) >= 2 && c.state_name() == "enabled"
        })
        .await;
        assert_eq!(c.state_name(), "enabled");
        util::read(&ch, 0, 1).await.unwrap();
        close_detach(desc, ch).await;
    });
}
