//! In-process target over loopback TCP: the RPCs set it up on a real
//! runtime (two reactors, interrupt mode), and a blocking client thread
//! built on the codec connects an admin and two I/O queues (which land on
//! different reactors), writes through in-capsule data and R2T, reads back,
//! and checks error statuses. The Python suite (test/test_nvmf_target.py)
//! does the same from an independent implementation.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nvmf::pdu::{Accept, DataHdr, Decoder, DecoderConfig, Encoder, IcReq, Pdu};
use nvmf::spec::*;
use serde_json::json;

const NQN: &str = "nqn.2016-06.io.spdk:loopback";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:0c0c0c0c-1111-2222-3333-444444444444";

struct Client {
    s: TcpStream,
    enc: Encoder,
    dec: Decoder,
    buf: Vec<u8>,
    cid: u16,
}

impl Client {
    fn connect(port: u16, digests: bool) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client {
            s,
            enc: Encoder::default(),
            dec: Decoder::new(DecoderConfig {
                accept: Accept::CtrlToHost,
                max_data: 1 << 20,
                ..Default::default()
            }),
            buf: Vec::new(),
            cid: 0,
        };
        let mut out = Vec::new();
        Encoder::icreq(
            &mut out,
            &IcReq {
                pfv: 0,
                hpda: 0,
                dgst: if digests { 3 } else { 0 },
                maxr2t: 0,
            },
        );
        c.s.write_all(&out).unwrap();
        match c.recv() {
            (Pdu::IcResp(r), _) => {
                assert_eq!((r.pfv, r.cpda), (0, 0));
                assert!(r.maxh2cdata >= 4096);
            }
            (p, _) => panic!("expected ICResp, got {p:?}"),
        }
        c.enc = Encoder {
            hdgst: digests,
            ddgst: digests,
            tx_pda: 0,
        };
        c.dec.cfg.hdgst = digests;
        c.dec.cfg.ddgst = digests;
        c
    }

    /// Next PDU as an owned copy: (pdu kind, data).
    fn recv(&mut self) -> (Pdu<'static>, Vec<u8>) {
        loop {
            if let Some(d) = self
                .dec
                .decode(&self.buf)
                .expect("valid PDU from the target")
            {
                assert!(d.data_digest_ok);
                let (pdu, data) = match d.pdu {
                    Pdu::C2HData(h, data) => (Pdu::C2HData(h, &[]), data.to_vec()),
                    Pdu::C2HTermReq(t, _) => (Pdu::C2HTermReq(t, &[]), Vec::new()),
                    Pdu::IcResp(r) => (Pdu::IcResp(r), Vec::new()),
                    Pdu::CapsuleResp(c) => (Pdu::CapsuleResp(c), Vec::new()),
                    Pdu::R2T(r) => (Pdu::R2T(r), Vec::new()),
                    other => panic!("unexpected {other:?}"),
                };
                let n = d.len;
                self.buf.drain(..n);
                return (pdu, data);
            }
            let mut tmp = [0u8; 65536];
            let n = self.s.read(&mut tmp).expect("read");
            assert!(n > 0, "target closed the connection");
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    /// Run a command; returns (cqe, data read).
    fn cmd(&mut self, mut sqe: Sqe, write: &[u8], icd: bool) -> (Cqe, Vec<u8>) {
        self.cid = self.cid.wrapping_add(1);
        sqe.cid = self.cid;
        sqe.flags = 0x40;
        if sqe.sgl.kind == 0 {
            // Hosts send a null transport SGL when there is no data (a
            // Data Block SGL with address subtype is refused with FES 6).
            sqe.sgl = Sgl::transport(sqe.sgl.len);
        }
        let mut out = Vec::new();
        if !write.is_empty() && icd {
            sqe.sgl = Sgl::icd(write.len() as u32);
            self.enc.capsule_cmd(&mut out, &sqe, write);
        } else {
            if !write.is_empty() {
                sqe.sgl = Sgl::transport(write.len() as u32);
            }
            self.enc.capsule_cmd(&mut out, &sqe, &[]);
        }
        self.s.write_all(&out).unwrap();
        let mut data = Vec::new();
        loop {
            match self.recv() {
                (Pdu::R2T(r), _) => {
                    assert_eq!(r.cccid, sqe.cid);
                    let mut out = Vec::new();
                    let (start, end) = (r.r2to as usize, (r.r2to + r.r2tl) as usize);
                    let mut off = start;
                    while off < end {
                        let n = (end - off).min(32768);
                        let h = DataHdr {
                            cccid: sqe.cid,
                            ttag: r.ttag,
                            datao: off as u32,
                            datal: 0,
                            last: off + n == end,
                            success: false,
                        };
                        self.enc.data_pdu(&mut out, false, &h, &write[off..off + n]);
                        off += n;
                    }
                    self.s.write_all(&out).unwrap();
                }
                (Pdu::C2HData(h, _), d) => {
                    assert_eq!((h.cccid, h.datao as usize), (sqe.cid, data.len()));
                    data.extend_from_slice(&d);
                    if h.success {
                        return (
                            Cqe {
                                cid: sqe.cid,
                                ..Default::default()
                            },
                            data,
                        );
                    }
                }
                (Pdu::CapsuleResp(c), _) => {
                    assert_eq!(c.cid, sqe.cid);
                    return (c, data);
                }
                (p, _) => panic!("unexpected {p:?}"),
            }
        }
    }

    fn connect_queue(&mut self, qid: u16, cntlid: u16) -> Cqe {
        let d = ConnectData {
            hostid: [7; 16],
            cntlid,
            subnqn: NQN.into(),
            hostnqn: HOSTNQN.into(),
        };
        let sqe = ConnectCmd {
            recfmt: 0,
            qid,
            sqsize: 31,
            cattr: 0,
            kato: if qid == 0 { 10000 } else { 0 },
        }
        .to_sqe(0);
        self.cmd(sqe, &d.to_bytes(), true).0
    }

    fn prop(&mut self, set: bool, ofst: u32, val: u32) -> Cqe {
        let sqe = Sqe {
            opc: fabrics::OPCODE,
            nsid: if set {
                fabrics::PROPERTY_SET
            } else {
                fabrics::PROPERTY_GET
            } as u32,
            cdw11: ofst,
            cdw12: val,
            ..Default::default()
        };
        self.cmd(sqe, &[], false).0
    }
}

fn rw(opc: u8, slba: u64, nlb: u32, len: u32) -> Sqe {
    Sqe {
        opc,
        nsid: 1,
        sgl: Sgl::transport(len),
        cdw10: slba as u32,
        cdw11: (slba >> 32) as u32,
        cdw12: nlb - 1,
        ..Default::default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn client_session(port: u16, digests: bool) {
    let mut a = Client::connect(port, digests);
    let cqe = a.connect_queue(0, 0xFFFF);
    assert!(cqe.status.is_success(), "{cqe:?}");
    let cntlid = cqe.dw0 as u16;
    a.prop(true, prop::CC, 0x0046_0001);
    assert_eq!(a.prop(false, prop::CSTS, 0).dw0 & 1, 1);
    let (cqe, id) = a.cmd(
        Sqe {
            opc: admin::IDENTIFY,
            cdw10: 1,
            sgl: Sgl::transport(4096),
            ..Default::default()
        },
        &[],
        false,
    );
    assert!(cqe.status.is_success());
    assert_eq!(u16::from_le_bytes([id[78], id[79]]), cntlid);
    let (cqe, _) = a.cmd(
        Sqe {
            opc: admin::SET_FEATURES,
            cdw10: 7,
            cdw11: 0x0001_0001,
            ..Default::default()
        },
        &[],
        false,
    );
    assert_eq!(cqe.dw0, 0x0001_0001);
    let mut q1 = Client::connect(port, digests);
    assert!(q1.connect_queue(1, cntlid).status.is_success());
    let mut q2 = Client::connect(port, digests);
    assert!(q2.connect_queue(2, cntlid).status.is_success());
    let small: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 1) as u8).collect();
    let big: Vec<u8> = (0..131072u32).map(|i| (i * 13 + 5) as u8).collect();
    assert!(q1
        .cmd(rw(nvm::WRITE, 0, 8, 4096), &small, true)
        .0
        .status
        .is_success());
    assert!(q2
        .cmd(rw(nvm::WRITE, 64, 256, 131072), &big, false)
        .0
        .status
        .is_success());
    assert_eq!(q2.cmd(rw(nvm::READ, 0, 8, 4096), &[], false).1, small);
    assert_eq!(q1.cmd(rw(nvm::READ, 64, 256, 131072), &[], false).1, big);
    let (cqe, _) = q1.cmd(rw(nvm::READ, 8191, 2, 1024), &[], false);
    assert_eq!(cqe.status, Status::generic(sc::LBA_OUT_OF_RANGE));
    let (cqe, _) = q1.cmd(
        Sqe {
            opc: 0x05,
            nsid: 1,
            ..Default::default()
        },
        &[],
        false,
    );
    assert_eq!(cqe.status, Status::generic(sc::INVALID_OPCODE));
    let (cqe, _) = q1.cmd(
        Sqe {
            nsid: 7,
            ..rw(nvm::READ, 0, 1, 512)
        },
        &[],
        false,
    );
    assert_eq!(cqe.status, Status::generic(sc::INVALID_NAMESPACE_OR_FORMAT));
    // Shutdown: SHST complete, then the I/O queues are closed.
    a.prop(true, prop::CC, 0x0046_4001);
    assert_eq!((a.prop(false, prop::CSTS, 0).dw0 >> 2) & 3, 2);
    let mut b = [0u8; 16];
    assert_eq!(q1.s.read(&mut b).unwrap_or(0), 0);
}

#[test]
fn loopback_admin_and_io_queues_on_two_reactors() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    for digests in [false, true] {
        let port = free_port();
        let done = Arc::new(AtomicBool::new(false));
        let d2 = done.clone();
        let ok = bdev::util::run_on_reactor(0x3, move || async move {
            nvmf::register_methods();
            ::rpc::set_state(::rpc::RUNTIME);
            bdev::modules::malloc::create(bdev::modules::malloc::CreateParams::new(
                "Lb0", 512, 8192,
            ))
            .unwrap();
            let call = |m: &'static str, p: serde_json::Value| async move {
                ::rpc::call(m, Some(p))
                    .await
                    .unwrap_or_else(|e| panic!("{m}: {e}"))
            };
            if nvmf::target::transport().is_none() {
                call("nvmf_create_transport", json!({"trtype": "TCP"})).await;
            }
            call(
                "nvmf_create_subsystem",
                json!({"nqn": NQN, "allow_any_host": true}),
            )
            .await;
            call(
                "nvmf_subsystem_add_ns",
                json!({"nqn": NQN, "namespace": {"bdev_name": "Lb0"}}),
            )
            .await;
            call(
                "nvmf_subsystem_add_listener",
                json!({"nqn": NQN, "listen_address": {"trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
            )
            .await;
            let h = std::thread::spawn(move || {
                client_session(port, digests);
                d2.store(true, Ordering::Release);
            });
            for _ in 0..3000 {
                if done.load(Ordering::Acquire) || h.is_finished() {
                    break;
                }
                reactor::sleep(Duration::from_millis(10)).await;
            }
            let ok = h.join().is_ok();
            call("nvmf_delete_subsystem", json!({"nqn": NQN})).await;
            nvmf::shutdown();
            ok
        });
        assert!(ok, "client session failed (digests: {digests})");
    }
}
