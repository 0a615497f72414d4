//! NVMe/TCP PDU codec for both directions (NVMe/TCP transport spec 1.0,
//! checked against Linux include/linux/nvme-tcp.h and SPDK nvme_tcp.h).
//!
//! * [`Decoder`] validates a PDU from the bytes of a socket buffer: first the
//!   header ([`Decoder::header`], enough to know where data lands so a caller
//!   can receive it straight into its own buffer), then the whole PDU
//!   ([`Decoder::decode`]). Errors say which field is wrong and carry the
//!   FES/FEI for the termination request.
//! * Encoders append PDUs to a `Vec<u8>` (no allocation once the vector has
//!   grown); data PDUs can be encoded header-only so the payload goes out
//!   from its own buffer (`sendmsg`/writev).

use crate::spec::{le16, le32, Cqe, Sqe, CQE_SIZE, SQE_SIZE};

/// Common header length.
pub const CH_LEN: usize = 8;
pub const IC_LEN: usize = 128;
pub const CMD_HLEN: usize = 72;
/// HLEN of CapsuleResp, H2CData, C2HData, R2T and TermReq.
pub const HLEN_24: usize = 24;
pub const DIGEST_LEN: usize = 4;
/// Maximum amount of offending header a TermReq carries.
pub const TERM_MAX_DATA: usize = 128;
pub const TERM_MAX_PLEN: usize = HLEN_24 + TERM_MAX_DATA;

/// A field's codes as an enum, with its decoder (`$from`, `None` for a
/// code it does not know): one table per field.
macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident: $repr:ty, $from:ident {
        $($(#[$vm:meta])* $v:ident = $code:literal,)*
    }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr($repr)]
        pub enum $name {
            $($(#[$vm])* $v = $code,)*
        }

        impl $name {
            pub fn $from(v: $repr) -> Option<$name> {
                match v {
                    $($code => Some($name::$v),)*
                    _ => None,
                }
            }
        }
    };
}

wire_enum!(
    /// PDU types.
    PduType: u8, from_u8 {
        IcReq = 0x00,
        IcResp = 0x01,
        H2CTermReq = 0x02,
        C2HTermReq = 0x03,
        CapsuleCmd = 0x04,
        CapsuleResp = 0x05,
        H2CData = 0x06,
        C2HData = 0x07,
        R2T = 0x09,
    }
);

impl PduType {
    /// True for PDUs a host sends to a controller.
    pub fn is_h2c(self) -> bool {
        matches!(
            self,
            PduType::IcReq | PduType::H2CTermReq | PduType::CapsuleCmd | PduType::H2CData
        )
    }
    /// Fixed HLEN of this type.
    pub fn hlen(self) -> usize {
        match self {
            PduType::IcReq | PduType::IcResp => IC_LEN,
            PduType::CapsuleCmd => CMD_HLEN,
            _ => HLEN_24,
        }
    }
    /// Whether header/data digests apply to this type at all.
    pub fn digestible(self) -> bool {
        !matches!(
            self,
            PduType::IcReq | PduType::IcResp | PduType::H2CTermReq | PduType::C2HTermReq
        )
    }
}

/// FLAGS bits.
pub mod flags {
    pub const HDGSTF: u8 = 1 << 0;
    pub const DDGSTF: u8 = 1 << 1;
    pub const LAST_PDU: u8 = 1 << 2;
    pub const SUCCESS: u8 = 1 << 3;
}

wire_enum!(
    /// Fatal Error Status of a termination request.
    Fes: u16, from_u16 {
        InvalidHeaderField = 1,
        PduSequenceError = 2,
        HeaderDigestError = 3,
        DataOutOfRange = 4,
        /// Also "R2T Limit Exceeded".
        DataLimitExceeded = 5,
        UnsupportedParameter = 6,
    }
);

/// Byte offsets of header fields (FEI values).
pub mod off {
    pub const TYPE: u32 = 0;
    pub const FLAGS: u32 = 1;
    pub const HLEN: u32 = 2;
    pub const PDO: u32 = 3;
    pub const PLEN: u32 = 4;
    pub const PFV: u32 = 8;
    pub const HPDA: u32 = 10;
    pub const DGST: u32 = 11;
    pub const MAXR2T: u32 = 12;
    pub const CCCID: u32 = 8;
    pub const TTAG: u32 = 10;
    pub const DATAO: u32 = 12;
    pub const DATAL: u32 = 16;
    /// SGL1 of the SQE inside a CapsuleCmd.
    pub const SGL: u32 = 8 + 24;
}

/// A fatal protocol error: the receiver answers with a TermReq carrying
/// `fes`/`fei` and closes the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} (FES {fes:?}, FEI {fei})")]
pub struct PduError {
    pub fes: Fes,
    /// Field error information: byte offset of the bad field for FES 1/6.
    pub fei: u32,
    /// What is wrong, for the log.
    pub what: &'static str,
}

impl PduError {
    pub fn new(fes: Fes, fei: u32, what: &'static str) -> PduError {
        PduError { fes, fei, what }
    }
    fn field(fei: u32, what: &'static str) -> PduError {
        PduError::new(Fes::InvalidHeaderField, fei, what)
    }
}

/// The 8-byte common header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommonHeader {
    pub pdu_type: u8,
    pub flags: u8,
    pub hlen: u8,
    pub pdo: u8,
    pub plen: u32,
}

impl CommonHeader {
    pub fn parse(b: &[u8]) -> CommonHeader {
        CommonHeader {
            pdu_type: b[0],
            flags: b[1],
            hlen: b[2],
            pdo: b[3],
            plen: le32(b, 4),
        }
    }
    pub fn write(&self, b: &mut [u8]) {
        b[0] = self.pdu_type;
        b[1] = self.flags;
        b[2] = self.hlen;
        b[3] = self.pdo;
        b[4..8].copy_from_slice(&self.plen.to_le_bytes());
    }
}

/// CRC32C (Castagnoli) as used by NVMe/TCP digests.
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Continue a CRC32C over several pieces (data split over buffers).
#[inline]
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

/// ICReq / ICResp parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IcReq {
    pub pfv: u16,
    /// 0's based dwords.
    pub hpda: u8,
    /// bit0 header digest, bit1 data digest.
    pub dgst: u8,
    /// 0's based.
    pub maxr2t: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IcResp {
    pub pfv: u16,
    pub cpda: u8,
    pub dgst: u8,
    /// Bytes, not 0's based.
    pub maxh2cdata: u32,
}

/// H2CData / C2HData header fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DataHdr {
    pub cccid: u16,
    /// TTAG for H2CData; reserved (0) for C2HData.
    pub ttag: u16,
    pub datao: u32,
    pub datal: u32,
    /// LAST_PDU flag.
    pub last: bool,
    /// SUCCESS flag (C2HData only).
    pub success: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct R2t {
    pub cccid: u16,
    pub ttag: u16,
    pub r2to: u32,
    pub r2tl: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TermReq {
    pub fes: u16,
    pub fei: u32,
}

/// A decoded PDU; data borrows from the input buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pdu<'a> {
    IcReq(IcReq),
    IcResp(IcResp),
    H2CTermReq(TermReq, &'a [u8]),
    C2HTermReq(TermReq, &'a [u8]),
    /// SQE and in-capsule data (possibly empty).
    CapsuleCmd(Sqe, &'a [u8]),
    CapsuleResp(Cqe),
    H2CData(DataHdr, &'a [u8]),
    C2HData(DataHdr, &'a [u8]),
    R2T(R2t),
}

/// Which PDUs a decoder accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accept {
    /// A controller: host→controller PDUs.
    HostToCtrl,
    /// A host: controller→host PDUs.
    CtrlToHost,
    /// Both (tests, tools).
    Any,
}

/// Negotiated connection parameters that govern decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderConfig {
    pub accept: Accept,
    pub hdgst: bool,
    pub ddgst: bool,
    /// Required alignment of received data (0's based dwords): CPDA when we
    /// are the controller, HPDA when we are the host.
    pub rx_pda: u8,
    /// Largest in-capsule data accepted in one CapsuleCmd.
    pub max_icd: u32,
    /// Largest DATAL accepted in one H2CData/C2HData PDU.
    pub max_data: u32,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        DecoderConfig {
            accept: Accept::Any,
            hdgst: false,
            ddgst: false,
            rx_pda: 0,
            max_icd: 8192,
            max_data: 1 << 20,
        }
    }
}

/// A validated header: where the data is and how long the PDU is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub ty: PduType,
    pub ch: CommonHeader,
    /// HLEN + header digest.
    pub header_len: usize,
    /// Offset of the data from the PDU start (0 if none).
    pub data_off: usize,
    pub data_len: usize,
    /// A data digest follows the data.
    pub has_ddgst: bool,
    pub plen: usize,
}

/// A complete PDU as decoded from a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded<'a> {
    pub pdu: Pdu<'a>,
    /// Bytes consumed from the buffer (PLEN).
    pub len: usize,
    /// False when the data digest did not match. Not fatal: the receiver
    /// fails the command (SPDK: Command Transient Transport Error).
    pub data_digest_ok: bool,
}

/// Incremental PDU decoder; it holds only the negotiated parameters, the
/// caller owns the byte buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Decoder {
    pub cfg: DecoderConfig,
}

impl Decoder {
    pub fn new(cfg: DecoderConfig) -> Decoder {
        Decoder { cfg }
    }

    /// Bytes needed before [`Decoder::header`] can decide (the header plus
    /// its digest), given at least the 8-byte common header.
    pub fn header_bytes_needed(&self, buf: &[u8]) -> usize {
        if buf.len() < CH_LEN {
            return CH_LEN;
        }
        let hlen = buf[2] as usize;
        let ty = PduType::from_u8(buf[0]);
        let dg = match ty {
            Some(t) if t.digestible() && self.cfg.hdgst => DIGEST_LEN,
            _ => 0,
        };
        (hlen + dg).max(CH_LEN)
    }

    /// Validate the header at the start of `buf`. `Ok(None)`: more bytes are
    /// needed. The header digest is checked here.
    pub fn header(&self, buf: &[u8]) -> Result<Option<Header>, PduError> {
        if buf.len() < CH_LEN {
            return Ok(None);
        }
        let ch = CommonHeader::parse(buf);
        let ty = self.pdu_type(&ch)?;
        let hlen = ch.hlen as usize;
        if !ty.digestible() {
            return Self::plain_header(ty, ch, buf);
        }
        let fl = self.check_flags(ty, &ch)?;
        let header_len = hlen + if fl.hdgst { DIGEST_LEN } else { 0 };
        let dg = if fl.ddgst { DIGEST_LEN } else { 0 };
        self.check_layout(&ch, header_len, dg, fl.carries_data)?;
        if buf.len() < header_len {
            return Ok(None);
        }
        if fl.hdgst {
            check_header_digest(buf, hlen)?;
        }
        let plen = ch.plen as usize;
        let (data_off, data_len) = if fl.carries_data {
            let pdo = ch.pdo as usize;
            (pdo, plen - pdo - dg)
        } else {
            (0, 0)
        };
        self.check_data_len(ty, buf, data_len)?;
        Ok(Some(Header {
            ty,
            ch,
            header_len,
            data_off,
            data_len,
            has_ddgst: fl.ddgst,
            plen,
        }))
    }

    /// The PDU type: known, allowed in this direction, with its HLEN.
    fn pdu_type(&self, ch: &CommonHeader) -> Result<PduType, PduError> {
        let ty =
            PduType::from_u8(ch.pdu_type).ok_or(PduError::field(off::TYPE, "unknown PDU type"))?;
        match self.cfg.accept {
            Accept::HostToCtrl if !ty.is_h2c() => {
                return Err(PduError::field(
                    off::TYPE,
                    "PDU type not valid host to controller",
                ))
            }
            Accept::CtrlToHost if ty.is_h2c() => {
                return Err(PduError::field(
                    off::TYPE,
                    "PDU type not valid controller to host",
                ))
            }
            _ => {}
        }
        if ch.hlen as usize != ty.hlen() {
            return Err(PduError::field(off::HLEN, "wrong HLEN for the PDU type"));
        }
        Ok(ty)
    }

    /// The header of a PDU that takes no digests: ICReq, ICResp, TermReqs.
    fn plain_header(ty: PduType, ch: CommonHeader, buf: &[u8]) -> Result<Option<Header>, PduError> {
        let (hlen, plen) = (ch.hlen as usize, ch.plen as usize);
        if ch.flags & 0x0F != 0 {
            return Err(PduError::field(
                off::FLAGS,
                "flags set on a PDU that takes none",
            ));
        }
        match ty {
            PduType::IcReq | PduType::IcResp => {
                if plen != IC_LEN {
                    return Err(PduError::field(off::PLEN, "ICReq/ICResp PLEN must be 128"));
                }
                if ch.pdo != 0 {
                    return Err(PduError::field(off::PDO, "ICReq/ICResp PDO must be 0"));
                }
            }
            _ => {
                if !(HLEN_24..=TERM_MAX_PLEN).contains(&plen) {
                    return Err(PduError::field(off::PLEN, "TermReq PLEN out of 24..152"));
                }
            }
        }
        if buf.len() < hlen {
            return Ok(None);
        }
        let data_len = plen - hlen;
        Ok(Some(Header {
            ty,
            ch,
            header_len: hlen,
            data_off: if data_len > 0 { hlen } else { 0 },
            data_len,
            has_ddgst: false,
            plen,
        }))
    }

    /// The flags of a digestible PDU: digests as negotiated, LAST_PDU and
    /// SUCCESS only where they belong.
    fn check_flags(&self, ty: PduType, ch: &CommonHeader) -> Result<Flags, PduError> {
        let f = ch.flags;
        let plen = ch.plen as usize;
        let hd = f & flags::HDGSTF != 0;
        if hd != self.cfg.hdgst {
            return Err(PduError::field(
                off::FLAGS,
                if hd {
                    "HDGSTF set but header digest not negotiated"
                } else {
                    "HDGSTF clear but header digest negotiated"
                },
            ));
        }
        let header_len = ch.hlen as usize + if hd { DIGEST_LEN } else { 0 };
        let dd = f & flags::DDGSTF != 0;
        let last = f & flags::LAST_PDU != 0;
        let success = f & flags::SUCCESS != 0;
        let carries_data = matches!(ty, PduType::H2CData | PduType::C2HData)
            || (ty == PduType::CapsuleCmd && plen > header_len);
        if (last || success) && !matches!(ty, PduType::H2CData | PduType::C2HData) {
            return Err(PduError::field(
                off::FLAGS,
                "LAST_PDU/SUCCESS on a PDU that is not data",
            ));
        }
        if success && ty != PduType::C2HData {
            return Err(PduError::field(off::FLAGS, "SUCCESS on H2CData"));
        }
        if success && !last {
            return Err(PduError::field(off::FLAGS, "SUCCESS without LAST_PDU"));
        }
        if dd && !carries_data {
            return Err(PduError::field(
                off::FLAGS,
                "DDGSTF set on a PDU without data",
            ));
        }
        if carries_data && dd != self.cfg.ddgst {
            return Err(PduError::field(
                off::FLAGS,
                if dd {
                    "DDGSTF set but data digest not negotiated"
                } else {
                    "DDGSTF clear but data digest negotiated"
                },
            ));
        }
        Ok(Flags {
            hdgst: hd,
            ddgst: dd,
            carries_data,
        })
    }

    /// PLEN and PDO against the header length, the data digest and the
    /// negotiated PDA.
    fn check_layout(
        &self,
        ch: &CommonHeader,
        header_len: usize,
        dg: usize,
        carries_data: bool,
    ) -> Result<(), PduError> {
        let plen = ch.plen as usize;
        if !carries_data {
            // CapsuleCmd without ICD, CapsuleResp, R2T.
            if plen != header_len {
                return Err(PduError::field(
                    off::PLEN,
                    "PLEN does not match a PDU without data",
                ));
            }
            // PDO 0 is what hosts send; tolerate PDO == header_len too.
            if ch.pdo != 0 && ch.pdo as usize != header_len {
                return Err(PduError::field(off::PDO, "PDO set on a PDU without data"));
            }
            return Ok(());
        }
        let pdo = ch.pdo as usize;
        if pdo < header_len || pdo > plen {
            return Err(PduError::field(off::PDO, "PDO outside the PDU"));
        }
        let align = (self.cfg.rx_pda as usize + 1) * 4;
        if self.cfg.rx_pda != 0 && !pdo.is_multiple_of(align) {
            return Err(PduError::field(
                off::PDO,
                "PDO not aligned to the negotiated PDA",
            ));
        }
        if plen < pdo + dg {
            return Err(PduError::field(
                off::PLEN,
                "PLEN smaller than PDO plus data digest",
            ));
        }
        Ok(())
    }

    /// The amount of data against the limits: in-capsule data, DATAL of a
    /// data PDU.
    fn check_data_len(&self, ty: PduType, buf: &[u8], data_len: usize) -> Result<(), PduError> {
        match ty {
            PduType::CapsuleCmd if data_len > self.cfg.max_icd as usize => Err(PduError::new(
                Fes::DataLimitExceeded,
                off::PLEN,
                "in-capsule data larger than allowed",
            )),
            PduType::H2CData | PduType::C2HData => {
                let o = off::DATAL as usize;
                let datal = le32(buf, o) as usize;
                if datal != data_len {
                    return Err(PduError::field(
                        off::DATAL,
                        "DATAL does not match PLEN - PDO",
                    ));
                }
                if datal == 0 {
                    return Err(PduError::field(off::DATAL, "data PDU with DATAL 0"));
                }
                if datal > self.cfg.max_data as usize {
                    return Err(PduError::new(
                        Fes::DataLimitExceeded,
                        off::DATAL,
                        "DATAL larger than the maximum data PDU size",
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Decode one whole PDU from the start of `buf`. `Ok(None)`: more bytes
    /// are needed (call again with more).
    pub fn decode<'a>(&self, buf: &'a [u8]) -> Result<Option<Decoded<'a>>, PduError> {
        let Some(h) = self.header(buf)? else {
            return Ok(None);
        };
        if buf.len() < h.plen {
            return Ok(None);
        }
        let data = &buf[h.data_off..h.data_off + h.data_len];
        let data_digest_ok = if h.has_ddgst {
            let p = h.data_off + h.data_len;
            let got = le32(buf, p);
            crc32c(data) == got
        } else {
            true
        };
        let pdu = parse_body(&h, buf, data);
        Ok(Some(Decoded {
            pdu,
            len: h.plen,
            data_digest_ok,
        }))
    }
}

/// The flags of a digestible PDU, checked.
struct Flags {
    hdgst: bool,
    ddgst: bool,
    carries_data: bool,
}

/// The header digest (CRC32C of the `hlen` header bytes) that follows them.
fn check_header_digest(buf: &[u8], hlen: usize) -> Result<(), PduError> {
    let want = crc32c(&buf[..hlen]);
    let got = le32(buf, hlen);
    if want != got {
        return Err(PduError::new(
            Fes::HeaderDigestError,
            0,
            "header digest mismatch",
        ));
    }
    Ok(())
}

/// Decode the PDU-specific header of a validated header `h` (`buf` holds at
/// least `h.header_len` bytes); `data` is the payload (may be empty).
pub fn parse_body<'a>(h: &Header, buf: &[u8], data: &'a [u8]) -> Pdu<'a> {
    let f = h.ch.flags;
    match h.ty {
        PduType::IcReq => Pdu::IcReq(IcReq {
            pfv: le16(buf, 8),
            hpda: buf[10],
            dgst: buf[11],
            maxr2t: le32(buf, 12),
        }),
        PduType::IcResp => Pdu::IcResp(IcResp {
            pfv: le16(buf, 8),
            cpda: buf[10],
            dgst: buf[11],
            maxh2cdata: le32(buf, 12),
        }),
        PduType::H2CTermReq => Pdu::H2CTermReq(
            TermReq {
                fes: le16(buf, 8),
                fei: le32(buf, 10),
            },
            data,
        ),
        PduType::C2HTermReq => Pdu::C2HTermReq(
            TermReq {
                fes: le16(buf, 8),
                fei: le32(buf, 10),
            },
            data,
        ),
        PduType::CapsuleCmd => Pdu::CapsuleCmd(Sqe::parse(&buf[8..8 + SQE_SIZE]), data),
        PduType::CapsuleResp => Pdu::CapsuleResp(Cqe::parse(&buf[8..8 + CQE_SIZE])),
        PduType::H2CData | PduType::C2HData => {
            let d = DataHdr {
                cccid: le16(buf, 8),
                ttag: le16(buf, 10),
                datao: le32(buf, 12),
                datal: le32(buf, 16),
                last: f & flags::LAST_PDU != 0,
                success: f & flags::SUCCESS != 0,
            };
            if h.ty == PduType::H2CData {
                Pdu::H2CData(d, data)
            } else {
                Pdu::C2HData(d, data)
            }
        }
        PduType::R2T => Pdu::R2T(R2t {
            cccid: le16(buf, 8),
            ttag: le16(buf, 10),
            r2to: le32(buf, 12),
            r2tl: le32(buf, 16),
        }),
    }
}

/// Validate ICReq parameters (controller side). Errors name the field.
pub fn check_icreq(ic: &IcReq) -> Result<(), PduError> {
    if ic.pfv != 0 {
        return Err(PduError::field(off::PFV, "unsupported PDU format version"));
    }
    if ic.hpda > 31 {
        return Err(PduError::field(off::HPDA, "HPDA out of range 0..31"));
    }
    if ic.dgst & !3 != 0 {
        return Err(PduError::field(off::DGST, "reserved digest bits set"));
    }
    Ok(())
}

/// Encoding parameters (negotiated).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Encoder {
    pub hdgst: bool,
    pub ddgst: bool,
    /// Alignment the peer requires for data we send (0's based dwords):
    /// HPDA when we are the controller, CPDA when we are the host.
    pub tx_pda: u8,
}

impl Encoder {
    fn hd(&self) -> usize {
        if self.hdgst {
            DIGEST_LEN
        } else {
            0
        }
    }

    fn push_hdgst(&self, out: &mut Vec<u8>, start: usize, hlen: usize) {
        if self.hdgst {
            let c = crc32c(&out[start..start + hlen]);
            out.extend_from_slice(&c.to_le_bytes());
        }
    }

    fn data_pdo(&self, hlen: usize) -> usize {
        let base = hlen + self.hd();
        let align = (self.tx_pda as usize + 1) * 4;
        base.div_ceil(align) * align
    }

    /// ICReq (never digested).
    pub fn icreq(out: &mut Vec<u8>, ic: &IcReq) {
        Self::ic(out, PduType::IcReq, ic.pfv, ic.hpda, ic.dgst, ic.maxr2t);
    }

    /// ICResp (never digested).
    pub fn icresp(out: &mut Vec<u8>, ic: &IcResp) {
        Self::ic(
            out,
            PduType::IcResp,
            ic.pfv,
            ic.cpda,
            ic.dgst,
            ic.maxh2cdata,
        );
    }

    /// ICReq and ICResp share one layout: PFV, the PDU data alignment,
    /// the digests, a 32-bit limit (MAXR2T, MAXH2CDATA).
    fn ic(out: &mut Vec<u8>, ty: PduType, pfv: u16, pda: u8, dgst: u8, limit: u32) {
        let s = out.len();
        out.resize(s + IC_LEN, 0);
        let b = &mut out[s..];
        CommonHeader {
            pdu_type: ty as u8,
            flags: 0,
            hlen: 128,
            pdo: 0,
            plen: 128,
        }
        .write(b);
        b[8..10].copy_from_slice(&pfv.to_le_bytes());
        b[10] = pda;
        b[11] = dgst;
        b[12..16].copy_from_slice(&limit.to_le_bytes());
    }

    /// H2CTermReq or C2HTermReq; `hdr` is the offending PDU header (up to
    /// 128 bytes are copied).
    pub fn term_req(out: &mut Vec<u8>, c2h: bool, fes: Fes, fei: u32, hdr: &[u8]) {
        let n = hdr.len().min(TERM_MAX_DATA);
        let s = out.len();
        out.resize(s + HLEN_24, 0);
        let ty = if c2h {
            PduType::C2HTermReq
        } else {
            PduType::H2CTermReq
        };
        let b = &mut out[s..];
        CommonHeader {
            pdu_type: ty as u8,
            flags: 0,
            hlen: 24,
            pdo: if n > 0 { 24 } else { 0 },
            plen: (HLEN_24 + n) as u32,
        }
        .write(b);
        b[8..10].copy_from_slice(&(fes as u16).to_le_bytes());
        b[10..14].copy_from_slice(&fei.to_le_bytes());
        out.extend_from_slice(&hdr[..n]);
    }

    /// CapsuleCmd with optional in-capsule data.
    pub fn capsule_cmd(&self, out: &mut Vec<u8>, sqe: &Sqe, icd: &[u8]) {
        let s = out.len();
        let has_data = !icd.is_empty();
        let pdo = if has_data { self.data_pdo(CMD_HLEN) } else { 0 };
        let dd = has_data && self.ddgst;
        let plen = if has_data {
            pdo + icd.len() + if dd { 4 } else { 0 }
        } else {
            CMD_HLEN + self.hd()
        };
        let mut fl = 0;
        if self.hdgst {
            fl |= flags::HDGSTF;
        }
        if dd {
            fl |= flags::DDGSTF;
        }
        out.resize(s + CMD_HLEN, 0);
        CommonHeader {
            pdu_type: PduType::CapsuleCmd as u8,
            flags: fl,
            hlen: CMD_HLEN as u8,
            pdo: pdo as u8,
            plen: plen as u32,
        }
        .write(&mut out[s..]);
        sqe.write(&mut out[s + 8..s + 8 + SQE_SIZE]);
        self.push_hdgst(out, s, CMD_HLEN);
        if has_data {
            out.resize(s + pdo, 0);
            out.extend_from_slice(icd);
            if dd {
                out.extend_from_slice(&crc32c(icd).to_le_bytes());
            }
        }
    }

    /// CapsuleResp.
    pub fn capsule_resp(&self, out: &mut Vec<u8>, cqe: &Cqe) {
        let s = out.len();
        out.resize(s + HLEN_24, 0);
        CommonHeader {
            pdu_type: PduType::CapsuleResp as u8,
            flags: if self.hdgst { flags::HDGSTF } else { 0 },
            hlen: 24,
            pdo: 0,
            plen: (HLEN_24 + self.hd()) as u32,
        }
        .write(&mut out[s..]);
        cqe.write(&mut out[s + 8..s + 24]);
        self.push_hdgst(out, s, HLEN_24);
    }

    /// R2T.
    pub fn r2t(&self, out: &mut Vec<u8>, r: &R2t) {
        let s = out.len();
        out.resize(s + HLEN_24, 0);
        CommonHeader {
            pdu_type: PduType::R2T as u8,
            flags: if self.hdgst { flags::HDGSTF } else { 0 },
            hlen: 24,
            pdo: 0,
            plen: (HLEN_24 + self.hd()) as u32,
        }
        .write(&mut out[s..]);
        let b = &mut out[s..];
        b[8..10].copy_from_slice(&r.cccid.to_le_bytes());
        b[10..12].copy_from_slice(&r.ttag.to_le_bytes());
        b[12..16].copy_from_slice(&r.r2to.to_le_bytes());
        b[16..20].copy_from_slice(&r.r2tl.to_le_bytes());
        self.push_hdgst(out, s, HLEN_24);
    }

    /// Header (plus header digest and padding) of an H2CData (`c2h` false)
    /// or C2HData PDU carrying `d.datal` bytes. The caller sends the data
    /// next, then the data digest if `self.ddgst` ([`crc32c`] of the data,
    /// little-endian). Returns the number of header bytes appended.
    pub fn data_header(&self, out: &mut Vec<u8>, c2h: bool, d: &DataHdr) -> usize {
        let s = out.len();
        let pdo = self.data_pdo(HLEN_24);
        let mut fl = 0;
        if self.hdgst {
            fl |= flags::HDGSTF;
        }
        if self.ddgst {
            fl |= flags::DDGSTF;
        }
        if d.last {
            fl |= flags::LAST_PDU;
        }
        if c2h && d.success {
            fl |= flags::SUCCESS;
        }
        let plen = pdo + d.datal as usize + if self.ddgst { 4 } else { 0 };
        out.resize(s + HLEN_24, 0);
        CommonHeader {
            pdu_type: if c2h {
                PduType::C2HData
            } else {
                PduType::H2CData
            } as u8,
            flags: fl,
            hlen: 24,
            pdo: pdo as u8,
            plen: plen as u32,
        }
        .write(&mut out[s..]);
        let b = &mut out[s..];
        b[8..10].copy_from_slice(&d.cccid.to_le_bytes());
        b[10..12].copy_from_slice(&(if c2h { 0 } else { d.ttag }).to_le_bytes());
        b[12..16].copy_from_slice(&d.datao.to_le_bytes());
        b[16..20].copy_from_slice(&d.datal.to_le_bytes());
        self.push_hdgst(out, s, HLEN_24);
        out.resize(s + pdo, 0);
        pdo
    }

    /// A whole H2CData/C2HData PDU with its data (`d.datal` is taken from
    /// `data.len()`).
    pub fn data_pdu(&self, out: &mut Vec<u8>, c2h: bool, d: &DataHdr, data: &[u8]) {
        let d = DataHdr {
            datal: data.len() as u32,
            ..*d
        };
        self.data_header(out, c2h, &d);
        out.extend_from_slice(data);
        if self.ddgst {
            out.extend_from_slice(&crc32c(data).to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests;
