//! Entry points shared by the cargo-fuzz targets (`nvmf/fuzz/`) and the
//! stable replay test (`tests/fuzz_replay.rs`). Both must never panic,
//! whatever the bytes.

use std::sync::{Arc, Mutex};

use crate::ctrlr;
use crate::pdu::{Accept, Decoder, DecoderConfig, Pdu};
use crate::spec::{admin, fabrics, ConnectCmd, ConnectData, Sqe};
use crate::target::{CtrlState, ListenAddr, SubType, Subsystem, TransportOpts};

/// Decode `data` as a PDU stream. Byte 0 picks the negotiated parameters
/// (digests, direction, PDA, limits); the rest is the stream.
pub fn pdu_decoder(data: &[u8]) {
    let Some((&sel, stream)) = data.split_first() else {
        return;
    };
    let cfg = DecoderConfig {
        accept: match sel & 3 {
            0 => Accept::HostToCtrl,
            1 => Accept::CtrlToHost,
            _ => Accept::Any,
        },
        hdgst: sel & 4 != 0,
        ddgst: sel & 8 != 0,
        rx_pda: (sel >> 4) & 3,
        max_icd: if sel & 0x40 != 0 { 8192 } else { 1024 },
        max_data: if sel & 0x80 != 0 { 131072 } else { 4096 },
    };
    let d = Decoder::new(cfg);
    let mut pos = 0;
    // Every prefix must be either "need more" or consistent with the whole.
    while pos < stream.len() {
        let rest = &stream[pos..];
        match d.decode(rest) {
            Ok(Some(x)) => {
                assert!(x.len > 0 && x.len <= rest.len());
                let _ = d
                    .header(&rest[..x.len])
                    .expect("a decoded PDU's header validates again");
                pos += x.len;
            }
            Ok(None) | Err(_) => break,
        }
    }
}

pub(crate) fn test_ctrl(disc: bool) -> Arc<crate::target::Ctrl> {
    let (nqn, subtype) = if disc {
        (crate::spec::DISCOVERY_NQN, SubType::Discovery)
    } else {
        ("nqn.2016-06.io.spdk:fuzz", SubType::Nvme)
    };
    let subsys = Arc::new(Subsystem {
        serial_number: "FUZZ".into(),
        model_number: "fuzz".into(),
        ..Subsystem::new(nqn.into(), subtype, 32, (1, 0xFFEF), true)
    });
    Arc::new(crate::target::Ctrl {
        cntlid: 1,
        subsys,
        hostnqn: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000000".into(),
        hostid: [0; 16],
        kato_ms: 0.into(),
        admin_reactor: 0,
        admin_conn: 0,
        ready: false.into(),
        last_ka_ns: 0.into(),
        listen: ListenAddr {
            adrfam: crate::target::Adrfam::Ipv4,
            traddr: "127.0.0.1".into(),
            trsvcid: "4420".into(),
        },
        state: Mutex::new(CtrlState::default()),
        destroyed: false.into(),
    })
}

/// Decode capsules from `data` (plain host-to-controller stream) and run
/// each one through the controller's command parser: fabrics Connect data
/// and properties, Identify, Get Log Page, Set/Get Features, on an I/O
/// and a discovery controller.
pub fn command_parser(data: &[u8]) {
    let d = Decoder::new(DecoderConfig {
        accept: Accept::HostToCtrl,
        ..Default::default()
    });
    let opts = TransportOpts::default();
    let ctrls = [test_ctrl(false), test_ctrl(true)];
    let mut pos = 0;
    let run = |sqe: &Sqe, icd: &[u8]| {
        let _ = sqe.direction();
        for c in &ctrls {
            let out = match sqe.opc {
                fabrics::OPCODE => match sqe.fctype() {
                    fabrics::CONNECT => {
                        let _ = ConnectCmd::from_sqe(sqe);
                        let _ = ConnectData::parse(icd);
                        None
                    }
                    fabrics::PROPERTY_GET => Some(ctrlr::property_get(c, &opts, sqe)),
                    fabrics::PROPERTY_SET => Some(ctrlr::property_set(c, sqe).0),
                    _ => None,
                },
                admin::IDENTIFY => Some(ctrlr::identify(c, &opts, sqe)),
                admin::GET_LOG_PAGE => Some(ctrlr::get_log_page(
                    c,
                    sqe,
                    "127.0.0.1",
                    sqe.sgl.len.min(1 << 20),
                )),
                admin::SET_FEATURES => Some(ctrlr::set_features(c, &opts, sqe)),
                admin::GET_FEATURES => Some(ctrlr::get_features(c, sqe)),
                _ => None,
            };
            if let Some(Some(v)) = out.map(|o| o.data) {
                assert!(v.len() <= 1 << 20);
            }
        }
    };
    // The raw bytes as one SQE too, so short inputs reach the parser.
    if data.len() >= 64 {
        run(&Sqe::parse(&data[..64]), &data[64..]);
    }
    while pos < data.len() {
        match d.decode(&data[pos..]) {
            Ok(Some(x)) => {
                if let Pdu::CapsuleCmd(sqe, icd) = x.pdu {
                    run(&sqe, icd);
                }
                pos += x.len;
            }
            _ => break,
        }
    }
}
