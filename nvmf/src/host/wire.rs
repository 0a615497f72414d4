//! Host-side helpers around the PDU codec ([`crate::pdu`]): the ICReq we
//! send, the checks we make on the controller's ICResp, and FES names for
//! the log.

use crate::pdu::{Decoder, DecoderConfig, Encoder, Fes, IcReq, Pdu, IC_LEN};

/// ICReq: PFV 0, HPDA 0, the digests we ask for, MAXR2T 0 (one
/// outstanding R2T per command, as both real hosts ask).
pub fn icreq(hdgst: bool, ddgst: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(IC_LEN);
    Encoder::icreq(
        &mut out,
        &IcReq {
            pfv: 0,
            hpda: 0,
            dgst: (hdgst as u8) | ((ddgst as u8) << 1),
            maxr2t: 0,
        },
    );
    out
}

/// What the controller granted in its ICResp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granted {
    pub cpda: u8,
    pub hdgst: bool,
    pub ddgst: bool,
    pub maxh2cdata: u32,
}

/// Decode and check an ICResp (exactly 128 bytes, HLEN = PLEN = 128).
pub fn parse_icresp(b: &[u8]) -> Result<Granted, String> {
    let dec = Decoder::new(DecoderConfig {
        accept: crate::pdu::Accept::CtrlToHost,
        ..DecoderConfig::default()
    });
    let d = match dec.decode(b) {
        Ok(Some(d)) => d,
        Ok(None) => return Err("truncated ICResp".into()),
        Err(e) => return Err(format!("bad ICResp: {e}")),
    };
    let ic = match d.pdu {
        Pdu::IcResp(ic) => ic,
        Pdu::C2HTermReq(t, _) => {
            return Err(format!(
                "controller refused the connection with a C2HTermReq: {} (FEI {:#x})",
                fes_name(t.fes),
                t.fei
            ))
        }
        other => return Err(format!("expected an ICResp, got {other:?}")),
    };
    if ic.pfv != 0 {
        return Err(format!("ICResp PFV {} (only 0 is defined)", ic.pfv));
    }
    if ic.cpda > 31 {
        return Err(format!("ICResp CPDA {} is out of range (0..31)", ic.cpda));
    }
    if ic.maxh2cdata < 4096 || !ic.maxh2cdata.is_multiple_of(4) {
        return Err(format!(
            "ICResp MAXH2CDATA {} (must be at least 4096 and a multiple of 4)",
            ic.maxh2cdata
        ));
    }
    Ok(Granted {
        cpda: ic.cpda,
        hdgst: ic.dgst & 1 != 0,
        ddgst: ic.dgst & 2 != 0,
        maxh2cdata: ic.maxh2cdata,
    })
}

/// Human text for a TermReq FES.
pub fn fes_name(fes: u16) -> &'static str {
    match Fes::from_u16(fes) {
        Some(Fes::InvalidHeaderField) => "invalid PDU header field",
        Some(Fes::PduSequenceError) => "PDU sequence error",
        Some(Fes::HeaderDigestError) => "header digest error",
        Some(Fes::DataOutOfRange) => "data transfer out of range",
        Some(Fes::DataLimitExceeded) => "data transfer limit exceeded",
        Some(Fes::UnsupportedParameter) => "unsupported parameter",
        None => "unknown error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdu::IcResp;

    fn resp(cpda: u8, dgst: u8, maxh2cdata: u32) -> Vec<u8> {
        let mut out = Vec::new();
        Encoder::icresp(
            &mut out,
            &IcResp {
                pfv: 0,
                cpda,
                dgst,
                maxh2cdata,
            },
        );
        out
    }

    #[test]
    fn icreq_layout() {
        let b = icreq(true, false);
        assert_eq!(&b[..8], &[0, 0, 128, 0, 128, 0, 0, 0]);
        assert_eq!(b[10], 0);
        assert_eq!(b[11], 1);
        assert_eq!(&b[12..16], &[0, 0, 0, 0]);
    }

    #[test]
    fn icresp_checks() {
        let g = parse_icresp(&resp(0, 3, 131072)).unwrap();
        assert!(g.hdgst && g.ddgst);
        assert_eq!(g.maxh2cdata, 131072);
        assert!(parse_icresp(&resp(0, 0, 4095))
            .unwrap_err()
            .contains("MAXH2CDATA"));
        assert!(parse_icresp(&resp(0, 0, 4098))
            .unwrap_err()
            .contains("MAXH2CDATA"));
        assert!(parse_icresp(&resp(32, 0, 8192))
            .unwrap_err()
            .contains("CPDA"));
        let mut b = resp(0, 0, 8192);
        b[4] = 129;
        assert!(parse_icresp(&b).is_err());
        let mut b = resp(0, 0, 8192);
        b[8] = 1;
        assert!(parse_icresp(&b).unwrap_err().contains("PFV"));
        // An ICReq where an ICResp belongs is refused.
        assert!(parse_icresp(&icreq(false, false)).is_err());
        // A C2HTermReq is reported with its reason.
        let mut t = Vec::new();
        Encoder::term_req(&mut t, true, Fes::InvalidHeaderField, 8, &[]);
        t.resize(128, 0);
        let e = parse_icresp(&t).unwrap_err();
        assert!(
            e.contains("invalid PDU header field") || e.contains("bad ICResp"),
            "{e}"
        );
    }
}
