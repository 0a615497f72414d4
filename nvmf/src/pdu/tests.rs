use super::*;
use crate::spec::{Cqe, Sgl, Sqe, Status};

fn all_encoders() -> Vec<Encoder> {
    let mut v = Vec::new();
    for hdgst in [false, true] {
        for ddgst in [false, true] {
            v.push(Encoder {
                hdgst,
                ddgst,
                tx_pda: 0,
            });
        }
    }
    v
}

fn dec_for(e: &Encoder, accept: Accept) -> Decoder {
    Decoder::new(DecoderConfig {
        accept,
        hdgst: e.hdgst,
        ddgst: e.ddgst,
        rx_pda: e.tx_pda,
        max_icd: 8192,
        max_data: 131072,
    })
}

/// A decoder with the default configuration, accepting `accept`.
fn accepting(accept: Accept) -> Decoder {
    Decoder::new(DecoderConfig {
        accept,
        ..Default::default()
    })
}

/// Every prefix is "need more", the whole is the PDU.
fn decode_all<'a>(d: &Decoder, b: &'a [u8]) -> Decoded<'a> {
    for n in 0..b.len() {
        assert_eq!(d.decode(&b[..n]), Ok(None), "prefix {n} of {}", b.len());
    }
    let r = d.decode(b).unwrap().unwrap();
    assert_eq!(r.len, b.len());
    r
}

#[test]
fn crc32c_check_values() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    // CapsuleResp header with header digest, from the interop notes.
    let e = Encoder {
        hdgst: true,
        ddgst: false,
        tx_pda: 0,
    };
    let mut out = Vec::new();
    e.capsule_resp(&mut out, &Cqe::default());
    assert_eq!(&out[..8], &[0x05, 0x01, 0x18, 0x00, 0x1c, 0, 0, 0]);
    assert_eq!(&out[24..28], &[0x9b, 0x12, 0x03, 0x89]);
    assert_eq!(crc32c_append(crc32c(b"1234"), b"56789"), 0xE306_9283);
}

#[test]
fn ic_round_trip() {
    let mut out = Vec::new();
    // PFV 0, HPDA 0, MAXR2T 0; both digests.
    let req = IcReq {
        dgst: 3,
        ..Default::default()
    };
    Encoder::icreq(&mut out, &req);
    assert_eq!(out.len(), 128);
    // Digests never apply to IC PDUs even when negotiated.
    let d = Decoder::new(DecoderConfig {
        hdgst: true,
        ..accepting(Accept::HostToCtrl).cfg
    });
    assert_eq!(decode_all(&d, &out).pdu, Pdu::IcReq(req));
    let mut out = Vec::new();
    let resp = IcResp {
        dgst: 1,
        maxh2cdata: 131072,
        ..Default::default()
    };
    Encoder::icresp(&mut out, &resp);
    let d = accepting(Accept::CtrlToHost);
    assert_eq!(decode_all(&d, &out).pdu, Pdu::IcResp(resp));
    assert!(check_icreq(&req).is_ok());
    assert_eq!(
        check_icreq(&IcReq { pfv: 1, ..req }).unwrap_err().fei,
        off::PFV
    );
    assert_eq!(
        check_icreq(&IcReq { hpda: 32, ..req }).unwrap_err().fei,
        off::HPDA
    );
}

#[test]
fn term_req_round_trip() {
    let mut out = Vec::new();
    let hdr = [0xAAu8; 200];
    Encoder::term_req(&mut out, true, Fes::HeaderDigestError, 0, &hdr);
    assert_eq!(out.len(), 152);
    let d = accepting(Accept::CtrlToHost);
    let r = decode_all(&d, &out);
    assert_eq!(
        r.pdu,
        Pdu::C2HTermReq(TermReq { fes: 3, fei: 0 }, &hdr[..128])
    );
    let mut out = Vec::new();
    Encoder::term_req(&mut out, false, Fes::InvalidHeaderField, 4, &[]);
    let d = accepting(Accept::HostToCtrl);
    assert_eq!(
        decode_all(&d, &out).pdu,
        Pdu::H2CTermReq(TermReq { fes: 1, fei: 4 }, &[])
    );
}

#[test]
fn capsule_round_trips_all_digest_modes() {
    let sqe = Sqe {
        opc: 1,
        flags: 0x40,
        cid: 0x1234,
        nsid: 1,
        sgl: Sgl::icd(4096),
        ..Default::default()
    };
    let icd: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    for e in all_encoders() {
        let d = dec_for(&e, Accept::HostToCtrl);
        let mut out = Vec::new();
        e.capsule_cmd(&mut out, &sqe, &icd);
        let r = decode_all(&d, &out);
        assert!(r.data_digest_ok);
        assert_eq!(r.pdu, Pdu::CapsuleCmd(sqe, &icd[..]));
        // Without data.
        let mut out = Vec::new();
        e.capsule_cmd(&mut out, &sqe, &[]);
        assert_eq!(out.len(), 72 + if e.hdgst { 4 } else { 0 });
        assert_eq!(decode_all(&d, &out).pdu, Pdu::CapsuleCmd(sqe, &[]));
        // Response.
        let cqe = Cqe {
            dw0: 7,
            cid: 0x1234,
            sqid: 1,
            status: Status::generic(0x80),
            ..Default::default()
        };
        let mut out = Vec::new();
        e.capsule_resp(&mut out, &cqe);
        let d = dec_for(&e, Accept::CtrlToHost);
        assert_eq!(decode_all(&d, &out).pdu, Pdu::CapsuleResp(cqe));
        let r = R2t {
            cccid: 0x1234,
            ttag: 5,
            r2to: 0,
            r2tl: 65536,
        };
        let mut out = Vec::new();
        e.r2t(&mut out, &r);
        assert_eq!(decode_all(&d, &out).pdu, Pdu::R2T(r));
    }
}

#[test]
fn data_round_trips_and_padding() {
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    for mut e in all_encoders() {
        for pda in [0u8, 3] {
            e.tx_pda = pda;
            let hdr = DataHdr {
                cccid: 9,
                ttag: 3,
                datao: 4096,
                datal: 0,
                last: true,
                success: false,
            };
            let mut out = Vec::new();
            e.data_pdu(&mut out, false, &hdr, &data);
            if pda == 3 {
                assert_eq!(out[3] as usize % 16, 0);
            } else {
                assert_eq!(out[3] as usize, 24 + if e.hdgst { 4 } else { 0 });
            }
            let d = dec_for(&e, Accept::HostToCtrl);
            let r = decode_all(&d, &out);
            assert_eq!(
                r.pdu,
                Pdu::H2CData(DataHdr { datal: 5000, ..hdr }, &data[..])
            );
            let hdr = DataHdr {
                success: true,
                ..hdr
            };
            let mut out = Vec::new();
            e.data_pdu(&mut out, true, &hdr, &data);
            let d = dec_for(&e, Accept::CtrlToHost);
            let r = decode_all(&d, &out);
            // C2HData carries no TTAG.
            assert_eq!(
                r.pdu,
                Pdu::C2HData(
                    DataHdr {
                        datal: 5000,
                        ttag: 0,
                        ..hdr
                    },
                    &data[..]
                )
            );
        }
    }
}

#[test]
fn data_digest_mismatch_is_not_fatal() {
    let e = Encoder {
        hdgst: false,
        ddgst: true,
        tx_pda: 0,
    };
    let mut out = Vec::new();
    e.data_pdu(
        &mut out,
        false,
        &DataHdr {
            cccid: 1,
            last: true,
            ..Default::default()
        },
        &[1; 512],
    );
    let n = out.len();
    out[n - 1] ^= 0xFF;
    let r = dec_for(&e, Accept::HostToCtrl)
        .decode(&out)
        .unwrap()
        .unwrap();
    assert!(!r.data_digest_ok);
    assert_eq!(r.len, n);
}

fn err(d: &Decoder, b: &[u8]) -> PduError {
    d.decode(b).expect_err("expected a PDU error")
}

/// The error of `pdu` with the bytes `edits` (offset, value) set.
fn err_with(d: &Decoder, pdu: &[u8], edits: &[(usize, u8)]) -> PduError {
    let mut b = pdu.to_vec();
    for &(at, v) in edits {
        b[at] = v;
    }
    d.decode(&b)
        .expect_err(&format!("expected a PDU error with bytes {edits:?} set"))
}

fn h2c() -> Decoder {
    Decoder::new(DecoderConfig {
        accept: Accept::HostToCtrl,
        max_icd: 8192,
        max_data: 65536,
        ..Default::default()
    })
}

fn cmd_bytes(e: &Encoder, icd: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let sqe = Sqe {
        opc: 1,
        cid: 1,
        sgl: Sgl::icd(icd.len() as u32),
        ..Default::default()
    };
    e.capsule_cmd(&mut out, &sqe, icd);
    out
}

#[test]
fn malformed_headers() {
    let d = h2c();
    let e = Encoder::default();
    // Unknown type.
    let mut b = cmd_bytes(&e, &[]);
    b[0] = 0x08;
    assert_eq!(
        err(&d, &b),
        PduError::new(Fes::InvalidHeaderField, 0, "unknown PDU type")
    );
    // Wrong direction.
    let mut out = Vec::new();
    e.capsule_resp(&mut out, &Cqe::default());
    assert_eq!(err(&d, &out).fei, off::TYPE);
    // Wrong HLEN.
    let cmd = cmd_bytes(&e, &[]);
    assert_eq!(err_with(&d, &cmd, &[(2, 24)]).fei, off::HLEN);
    // PLEN of a data-less capsule wrong.
    let x = err_with(&d, &cmd, &[(4, 73)]);
    assert_eq!((x.fes, x.fei), (Fes::InvalidHeaderField, off::PDO));
    // IC with flags / PLEN / PDO.
    let mut ic = Vec::new();
    Encoder::icreq(&mut ic, &IcReq::default());
    for (at, v, fei) in [(1, 1, off::FLAGS), (4, 129, off::PLEN), (3, 8, off::PDO)] {
        assert_eq!(
            err_with(&d, &ic, &[(at, v)]).fei,
            fei,
            "ICReq byte {at} = {v}"
        );
    }
    // TermReq too long.
    let mut t = Vec::new();
    Encoder::term_req(&mut t, false, Fes::PduSequenceError, 0, &[]);
    t[4] = 200;
    assert_eq!(err(&d, &t).fei, off::PLEN);
}

#[test]
fn malformed_digest_flags_and_digests() {
    let plain = Encoder::default();
    let hd = Encoder {
        hdgst: true,
        ddgst: false,
        tx_pda: 0,
    };
    let dd = Encoder {
        hdgst: false,
        ddgst: true,
        tx_pda: 0,
    };
    let dec_plain = h2c();
    let dec_hd = dec_for(&hd, Accept::HostToCtrl);
    let dec_dd = dec_for(&dd, Accept::HostToCtrl);
    // HDGSTF set without negotiation and vice versa.
    assert_eq!(err(&dec_plain, &cmd_bytes(&hd, &[])).fei, off::FLAGS);
    assert_eq!(err(&dec_hd, &cmd_bytes(&plain, &[])).fei, off::FLAGS);
    // DDGSTF mismatch with data.
    assert_eq!(err(&dec_plain, &cmd_bytes(&dd, &[1; 64])).fei, off::FLAGS);
    assert_eq!(err(&dec_dd, &cmd_bytes(&plain, &[1; 64])).fei, off::FLAGS);
    // DDGSTF on a PDU without data.
    let mut b = cmd_bytes(&plain, &[]);
    b[1] |= flags::DDGSTF;
    assert_eq!(err(&dec_dd, &b).fei, off::FLAGS);
    // Header digest corrupted: FES 3, detected as soon as the header is in.
    let mut b = cmd_bytes(&hd, &[]);
    b[76 - 1] ^= 1;
    assert_eq!(err(&dec_hd, &b[..76]).fes, Fes::HeaderDigestError);
    let mut b = cmd_bytes(&hd, &[]);
    b[20] ^= 1;
    assert_eq!(err(&dec_hd, &b).fes, Fes::HeaderDigestError);
}

#[test]
fn malformed_data_pdus() {
    let d = h2c();
    let e = Encoder::default();
    let mk = |hdr: DataHdr, data: &[u8]| {
        let mut out = Vec::new();
        e.data_pdu(&mut out, false, &hdr, data);
        out
    };
    let ok = mk(
        DataHdr {
            cccid: 1,
            last: true,
            ..Default::default()
        },
        &[0; 100],
    );
    assert!(d.decode(&ok).unwrap().is_some());
    // DATAL disagrees with PLEN; PDO beyond PLEN / below the header;
    // DATAL 0.
    let cases: [(&[(usize, u8)], u32); 4] = [
        (&[(16, 50)], off::DATAL),
        (&[(3, 200)], off::PDO),
        (&[(3, 8)], off::PDO),
        (&[(4, 24), (16, 0)], off::DATAL),
    ];
    for (edits, fei) in cases {
        assert_eq!(err_with(&d, &ok, edits).fei, fei, "H2CData with {edits:?}");
    }
    // Larger than max_data: FES 5.
    let big = mk(
        DataHdr {
            cccid: 1,
            last: true,
            ..Default::default()
        },
        &vec![0; 65540],
    );
    assert_eq!(err(&d, &big).fes, Fes::DataLimitExceeded);
    // SUCCESS on H2CData; SUCCESS without LAST on C2HData; LAST on a capsule.
    let mut b = ok.clone();
    b[1] |= flags::SUCCESS;
    assert_eq!(err(&d, &b).fei, off::FLAGS);
    let mut c = Vec::new();
    e.data_pdu(
        &mut c,
        true,
        &DataHdr {
            cccid: 1,
            ..Default::default()
        },
        &[0; 8],
    );
    c[1] |= flags::SUCCESS;
    let dh = accepting(Accept::CtrlToHost);
    assert_eq!(err(&dh, &c).what, "SUCCESS without LAST_PDU");
    let mut b = cmd_bytes(&e, &[]);
    b[1] |= flags::LAST_PDU;
    assert_eq!(err(&d, &b).fei, off::FLAGS);
    // In-capsule data over the limit: FES 5 at PLEN.
    let b = cmd_bytes(&e, &vec![0; 8196]);
    let x = err(&d, &b);
    assert_eq!((x.fes, x.fei), (Fes::DataLimitExceeded, off::PLEN));
    // Misaligned PDO with CPDA.
    let da = Decoder::new(DecoderConfig { rx_pda: 3, ..d.cfg });
    assert_eq!(err(&da, &ok).fei, off::PDO);
}

#[test]
fn stream_of_pdus() {
    let e = Encoder {
        hdgst: true,
        ddgst: true,
        tx_pda: 0,
    };
    let d = dec_for(&e, Accept::HostToCtrl);
    let mut stream = Vec::new();
    for i in 0..10u16 {
        let sqe = Sqe {
            opc: 2,
            cid: i,
            sgl: Sgl::transport(4096),
            ..Default::default()
        };
        e.capsule_cmd(&mut stream, &sqe, &[]);
        e.data_pdu(
            &mut stream,
            false,
            &DataHdr {
                cccid: i,
                ttag: i,
                last: true,
                ..Default::default()
            },
            &[i as u8; 33],
        );
    }
    let mut pos = 0;
    let mut n = 0;
    while pos < stream.len() {
        let r = d.decode(&stream[pos..]).unwrap().unwrap();
        pos += r.len;
        n += 1;
    }
    assert_eq!(n, 20);
}

proptest::proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
                                hdgst: bool, ddgst: bool) {
        for accept in [Accept::HostToCtrl, Accept::CtrlToHost, Accept::Any] {
            let d = Decoder::new(DecoderConfig { accept, hdgst, ddgst, ..Default::default() });
            let _ = d.decode(&bytes);
        }
    }

    #[test]
    fn random_data_pdus_round_trip(len in 1usize..3000, datao: u32, cccid: u16, hdgst: bool, ddgst: bool, pda in 0u8..4) {
        let e = Encoder { hdgst, ddgst, tx_pda: pda };
        let data = vec![0x5Au8; len];
        let mut out = Vec::new();
        e.data_pdu(&mut out, true, &DataHdr { cccid, datao, last: true, ..Default::default() }, &data);
        let r = dec_for(&e, Accept::CtrlToHost).decode(&out).unwrap().unwrap();
        proptest::prop_assert!(r.data_digest_ok);
        proptest::prop_assert_eq!(r.pdu, Pdu::C2HData(DataHdr { cccid, datao, datal: len as u32, last: true, ..Default::default() }, &data[..]));
    }
}
