//! NVMe and NVMe-oF structures shared by the target and the host: SQE/CQE,
//! SGL descriptors, opcodes, status codes, Connect data, property offsets and
//! the byte offsets of the Identify / log page layouts we fill.
//!
//! Every multi-byte field is little-endian. Constants were cross-checked
//! against include/linux/nvme.h and libnvme types.h.

/// Well-known discovery subsystem NQN.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

pub const SQE_SIZE: usize = 64;
pub const CQE_SIZE: usize = 16;

/// Little-endian fields at byte offset `o` of `b`, for every decoder in
/// the crate (target and host).
#[inline]
pub(crate) fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
#[inline]
pub(crate) fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
#[inline]
pub(crate) fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Admin command opcodes.
pub mod admin {
    pub const DELETE_SQ: u8 = 0x00;
    pub const CREATE_SQ: u8 = 0x01;
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const DELETE_CQ: u8 = 0x04;
    pub const CREATE_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0A;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0C;
    pub const KEEP_ALIVE: u8 = 0x18;
}

/// NVM command set opcodes.
pub mod nvm {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Fabrics command opcode and command types (FCTYPE, SQE byte 4).
pub mod fabrics {
    pub const OPCODE: u8 = 0x7F;
    pub const PROPERTY_SET: u8 = 0x00;
    pub const CONNECT: u8 = 0x01;
    pub const PROPERTY_GET: u8 = 0x04;
    pub const AUTH_SEND: u8 = 0x05;
    pub const AUTH_RECV: u8 = 0x06;
    pub const DISCONNECT: u8 = 0x08;
}

/// Controller property (register) offsets.
pub mod prop {
    pub const CAP: u32 = 0x00;
    pub const VS: u32 = 0x08;
    pub const CC: u32 = 0x14;
    pub const CSTS: u32 = 0x1C;
    pub const NSSR: u32 = 0x20;
    pub const CRTO: u32 = 0x68;
}

/// Identify CNS values.
pub mod cns {
    pub const NAMESPACE: u8 = 0x00;
    pub const CONTROLLER: u8 = 0x01;
    pub const ACTIVE_NS_LIST: u8 = 0x02;
    pub const NS_ID_DESCRIPTORS: u8 = 0x03;
}

/// Namespace identification descriptor types (Identify CNS 03h).
pub mod nidt {
    pub const EUI64: u8 = 0x01;
    pub const NGUID: u8 = 0x02;
    pub const UUID: u8 = 0x03;
    pub const CSI: u8 = 0x04;
}

/// Log page identifiers.
pub mod lid {
    pub const ERROR: u8 = 0x01;
    pub const SMART: u8 = 0x02;
    pub const FW_SLOT: u8 = 0x03;
    pub const CHANGED_NS: u8 = 0x04;
    pub const CMD_EFFECTS: u8 = 0x05;
    pub const DISCOVERY: u8 = 0x70;
}

/// Feature identifiers.
pub mod fid {
    pub const ARBITRATION: u8 = 0x01;
    pub const POWER_MGMT: u8 = 0x02;
    pub const TEMP_THRESHOLD: u8 = 0x04;
    pub const ERROR_RECOVERY: u8 = 0x05;
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const IRQ_COALESCING: u8 = 0x08;
    pub const IRQ_VECTOR_CONFIG: u8 = 0x09;
    pub const WRITE_ATOMICITY: u8 = 0x0A;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0B;
    pub const KEEP_ALIVE_TIMER: u8 = 0x0F;
    pub const HOST_IDENTIFIER: u8 = 0x81;
}

/// Status code types.
pub mod sct {
    pub const GENERIC: u8 = 0;
    pub const COMMAND_SPECIFIC: u8 = 1;
    pub const MEDIA: u8 = 2;
}

/// Generic status codes (SCT 0).
pub mod sc {
    pub const SUCCESS: u8 = 0x00;
    pub const INVALID_OPCODE: u8 = 0x01;
    pub const INVALID_FIELD: u8 = 0x02;
    pub const DATA_TRANSFER_ERROR: u8 = 0x04;
    pub const ABORTED_POWER_LOSS: u8 = 0x05;
    pub const INTERNAL_ERROR: u8 = 0x06;
    pub const ABORTED_BY_REQUEST: u8 = 0x07;
    pub const ABORTED_SQ_DELETION: u8 = 0x08;
    pub const INVALID_NAMESPACE_OR_FORMAT: u8 = 0x0B;
    pub const COMMAND_SEQUENCE_ERROR: u8 = 0x0C;
    pub const INVALID_SGL_SEG_DESCRIPTOR: u8 = 0x0D;
    pub const DATA_SGL_LENGTH_INVALID: u8 = 0x0F;
    pub const SGL_DESCRIPTOR_TYPE_INVALID: u8 = 0x11;
    pub const INVALID_SGL_OFFSET: u8 = 0x16;
    pub const KEEP_ALIVE_EXPIRED: u8 = 0x19;
    pub const KEEP_ALIVE_INVALID: u8 = 0x1A;
    pub const COMMAND_TRANSIENT_TRANSPORT_ERROR: u8 = 0x22;
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;
    pub const NAMESPACE_NOT_READY: u8 = 0x82;
}

/// Command-specific status codes (SCT 1).
pub mod csc {
    pub const INVALID_QUEUE_IDENTIFIER: u8 = 0x01;
    pub const ASYNC_EVENT_LIMIT_EXCEEDED: u8 = 0x05;
    pub const INVALID_LOG_PAGE: u8 = 0x09;
    pub const FEATURE_NOT_SAVEABLE: u8 = 0x0D;
    pub const FEATURE_NOT_CHANGEABLE: u8 = 0x0E;
    /// Fabrics: Connect Incompatible Format.
    pub const CONNECT_INCOMPATIBLE_FORMAT: u8 = 0x80;
    pub const CONNECT_CONTROLLER_BUSY: u8 = 0x81;
    pub const CONNECT_INVALID_PARAMETERS: u8 = 0x82;
    pub const CONNECT_RESTART_DISCOVERY: u8 = 0x83;
    pub const CONNECT_INVALID_HOST: u8 = 0x84;
    pub const INVALID_QUEUE_TYPE: u8 = 0x85;
    pub const AUTH_REQUIRED: u8 = 0x91;
}

/// Media and data integrity status codes (SCT 2).
pub mod msc {
    pub const WRITE_FAULT: u8 = 0x80;
    pub const UNRECOVERED_READ_ERROR: u8 = 0x81;
    pub const ACCESS_DENIED: u8 = 0x86;
}

/// A completion status (the CQE STATUS field without the phase bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
    pub dnr: bool,
}

impl Status {
    pub const SUCCESS: Status = Status {
        sct: 0,
        sc: 0,
        dnr: false,
    };

    pub const fn new(sct: u8, sc: u8, dnr: bool) -> Status {
        Status { sct, sc, dnr }
    }
    /// Generic status with DNR set (the usual "this will never work").
    pub const fn generic(sc: u8) -> Status {
        Status {
            sct: sct::GENERIC,
            sc,
            dnr: true,
        }
    }
    /// Command-specific status with DNR set.
    pub const fn specific(sc: u8) -> Status {
        Status {
            sct: sct::COMMAND_SPECIFIC,
            sc,
            dnr: true,
        }
    }
    pub fn is_success(&self) -> bool {
        self.sct == 0 && self.sc == 0
    }
    /// STATUS field: (DNR<<15) | (SCT<<9) | (SC<<1) | P (P = 0 over fabrics).
    pub fn to_u16(self) -> u16 {
        ((self.dnr as u16) << 15) | (((self.sct & 7) as u16) << 9) | ((self.sc as u16) << 1)
    }
    pub fn from_u16(v: u16) -> Status {
        Status {
            sct: ((v >> 9) & 7) as u8,
            sc: ((v >> 1) & 0xFF) as u8,
            dnr: v & 0x8000 != 0,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sct {:#x} sc {:#04x}{}",
            self.sct,
            self.sc,
            if self.dnr { " dnr" } else { "" }
        )
    }
}

/// SGL descriptor (16 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Sgl {
    pub addr: u64,
    pub len: u32,
    /// Byte 15: (TYPE << 4) | SUBTYPE.
    pub kind: u8,
}

impl Sgl {
    /// Data Block, subtype Offset: in-capsule data.
    pub const DATA_BLOCK_OFFSET: u8 = 0x01;
    /// Transport SGL Data Block (type 5, subtype 0xA): data by R2T/H2C or C2H.
    pub const TRANSPORT_DATA_BLOCK: u8 = 0x5A;

    pub fn icd(len: u32) -> Sgl {
        Sgl {
            addr: 0,
            len,
            kind: Self::DATA_BLOCK_OFFSET,
        }
    }
    pub fn transport(len: u32) -> Sgl {
        Sgl {
            addr: 0,
            len,
            kind: Self::TRANSPORT_DATA_BLOCK,
        }
    }
    pub fn parse(b: &[u8]) -> Sgl {
        Sgl {
            addr: le64(b, 0),
            len: le32(b, 8),
            kind: b[15],
        }
    }
    pub fn write(&self, b: &mut [u8]) {
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..15].fill(0);
        b[15] = self.kind;
    }
}

/// Submission queue entry (64 bytes), decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Sqe {
    pub opc: u8,
    /// Byte 1: FUSE bits 1:0, PSDT bits 7:6.
    pub flags: u8,
    pub cid: u16,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub mptr: u64,
    pub sgl: Sgl,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
}

impl Sqe {
    /// Decode from exactly 64 bytes (panics if shorter: callers slice a
    /// validated capsule).
    pub fn parse(b: &[u8]) -> Sqe {
        assert!(b.len() >= SQE_SIZE);
        Sqe {
            opc: b[0],
            flags: b[1],
            cid: le16(b, 2),
            nsid: le32(b, 4),
            cdw2: le32(b, 8),
            cdw3: le32(b, 12),
            mptr: le64(b, 16),
            sgl: Sgl::parse(&b[24..40]),
            cdw10: le32(b, 40),
            cdw11: le32(b, 44),
            cdw12: le32(b, 48),
            cdw13: le32(b, 52),
            cdw14: le32(b, 56),
            cdw15: le32(b, 60),
        }
    }
    pub fn write(&self, b: &mut [u8]) {
        b[0] = self.opc;
        b[1] = self.flags;
        b[2..4].copy_from_slice(&self.cid.to_le_bytes());
        b[4..8].copy_from_slice(&self.nsid.to_le_bytes());
        b[8..12].copy_from_slice(&self.cdw2.to_le_bytes());
        b[12..16].copy_from_slice(&self.cdw3.to_le_bytes());
        b[16..24].copy_from_slice(&self.mptr.to_le_bytes());
        self.sgl.write(&mut b[24..40]);
        for (i, v) in [
            self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15,
        ]
        .iter()
        .enumerate()
        {
            b[40 + 4 * i..44 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
    }
    pub fn to_bytes(&self) -> [u8; SQE_SIZE] {
        let mut b = [0u8; SQE_SIZE];
        self.write(&mut b);
        b
    }
    /// FCTYPE of a fabrics command (SQE byte 4, the low byte of NSID).
    pub fn fctype(&self) -> u8 {
        self.nsid as u8
    }
    pub fn fuse(&self) -> u8 {
        self.flags & 3
    }
    pub fn psdt(&self) -> u8 {
        self.flags >> 6
    }
    /// Starting LBA of an NVM command (CDW10..11).
    pub fn slba(&self) -> u64 {
        (self.cdw10 as u64) | ((self.cdw11 as u64) << 32)
    }
    /// Number of logical blocks (CDW12 bits 15:0, 0's based) + 1.
    pub fn nlb(&self) -> u32 {
        (self.cdw12 & 0xFFFF) + 1
    }
    pub fn fua(&self) -> bool {
        self.cdw12 & (1 << 30) != 0
    }
    /// Data direction implied by the opcode (or FCTYPE for fabrics).
    pub fn direction(&self) -> DataDir {
        let code = if self.opc == fabrics::OPCODE {
            self.fctype()
        } else {
            self.opc
        };
        match code & 3 {
            0 => DataDir::None,
            1 => DataDir::HostToCtrl,
            2 => DataDir::CtrlToHost,
            _ => DataDir::Bidirectional,
        }
    }
}

/// Data direction of a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataDir {
    None,
    HostToCtrl,
    CtrlToHost,
    Bidirectional,
}

/// Completion queue entry (16 bytes), decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Cqe {
    pub dw0: u32,
    pub dw1: u32,
    pub sqhd: u16,
    pub sqid: u16,
    pub cid: u16,
    pub status: Status,
}

impl Cqe {
    pub fn parse(b: &[u8]) -> Cqe {
        assert!(b.len() >= CQE_SIZE);
        Cqe {
            dw0: le32(b, 0),
            dw1: le32(b, 4),
            sqhd: le16(b, 8),
            sqid: le16(b, 10),
            cid: le16(b, 12),
            status: Status::from_u16(le16(b, 14)),
        }
    }
    pub fn write(&self, b: &mut [u8]) {
        b[0..4].copy_from_slice(&self.dw0.to_le_bytes());
        b[4..8].copy_from_slice(&self.dw1.to_le_bytes());
        b[8..10].copy_from_slice(&self.sqhd.to_le_bytes());
        b[10..12].copy_from_slice(&self.sqid.to_le_bytes());
        b[12..14].copy_from_slice(&self.cid.to_le_bytes());
        b[14..16].copy_from_slice(&self.status.to_u16().to_le_bytes());
    }
    pub fn to_bytes(&self) -> [u8; CQE_SIZE] {
        let mut b = [0u8; CQE_SIZE];
        self.write(&mut b);
        b
    }
}

/// Fabrics Connect command fields (SQE bytes 40..51).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnectCmd {
    pub recfmt: u16,
    pub qid: u16,
    /// 0's based.
    pub sqsize: u16,
    pub cattr: u8,
    /// Keep-alive timeout in ms (admin queue only).
    pub kato: u32,
}

impl ConnectCmd {
    /// CATTR bit 2: the host disables SQ flow control.
    pub const CATTR_DISABLE_SQFLOW: u8 = 1 << 2;

    pub fn from_sqe(s: &Sqe) -> ConnectCmd {
        ConnectCmd {
            recfmt: s.cdw10 as u16,
            qid: (s.cdw10 >> 16) as u16,
            sqsize: s.cdw11 as u16,
            cattr: (s.cdw11 >> 16) as u8,
            kato: s.cdw12,
        }
    }
    /// Fill a fabrics Connect SQE (the SGL is set by the caller's transport).
    pub fn to_sqe(&self, cid: u16) -> Sqe {
        Sqe {
            opc: fabrics::OPCODE,
            flags: 0x40,
            cid,
            nsid: fabrics::CONNECT as u32,
            sgl: Sgl::icd(CONNECT_DATA_SIZE as u32),
            cdw10: self.recfmt as u32 | ((self.qid as u32) << 16),
            cdw11: self.sqsize as u32 | ((self.cattr as u32) << 16),
            cdw12: self.kato,
            ..Default::default()
        }
    }
}

/// Offsets inside the Connect SQE (for Connect Invalid Parameters IPO, with
/// IATTR 0): the QID (CDW10 bits 31:16) and SQSIZE (CDW11 bits 15:0).
pub const CONNECT_SQE_QID_OFF: u16 = 42;
pub const CONNECT_SQE_SQSIZE_OFF: u16 = 44;

/// Dataset Management (NVM command set 3.2.3): CDW10 bits 7:0 hold the
/// number of ranges minus one, CDW11 bit 2 asks to deallocate; the data is
/// an array of 16-byte ranges. Encoded by the host, decoded by the target,
/// both here.
pub mod dsm {
    /// CDW11 attribute: deallocate the ranges.
    pub const ATTR_DEALLOCATE: u32 = 1 << 2;
    /// Bytes per range in the data.
    pub const RANGE_SIZE: usize = 16;
    /// At most this many ranges per command.
    pub const MAX_RANGES: usize = 256;

    /// Number of ranges a command's CDW10 announces (1..=256).
    pub fn num_ranges(cdw10: u32) -> usize {
        (cdw10 & 0xFF) as usize + 1
    }

    /// CDW10 announcing `n` ranges (1..=256).
    pub fn cdw10(n: usize) -> u32 {
        (n.clamp(1, MAX_RANGES) - 1) as u32
    }

    /// One range: context attributes (bytes 0..4), length in logical blocks
    /// (4..8), starting LBA (8..16).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct Range {
        pub attributes: u32,
        pub nlb: u32,
        pub slba: u64,
    }

    impl Range {
        pub fn encode(&self) -> [u8; RANGE_SIZE] {
            let mut b = [0u8; RANGE_SIZE];
            b[0..4].copy_from_slice(&self.attributes.to_le_bytes());
            b[4..8].copy_from_slice(&self.nlb.to_le_bytes());
            b[8..16].copy_from_slice(&self.slba.to_le_bytes());
            b
        }

        /// The range at the start of `b` (at least [`RANGE_SIZE`] bytes).
        pub fn decode(b: &[u8]) -> Range {
            let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
            let mut lba = [0u8; 8];
            lba.copy_from_slice(&b[8..16]);
            Range {
                attributes: u32_at(0),
                nlb: u32_at(4),
                slba: u64::from_le_bytes(lba),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn range_round_trips() {
            let r = Range {
                attributes: 7,
                nlb: 0x1234_5678,
                slba: 0x0102_0304_0506_0708,
            };
            let b = r.encode();
            assert_eq!(&b[4..8], &0x1234_5678u32.to_le_bytes());
            assert_eq!(&b[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
            assert_eq!(Range::decode(&b), r);
            assert_eq!(num_ranges(cdw10(1)), 1);
            assert_eq!(num_ranges(cdw10(256)), 256);
        }
    }
}

pub const CONNECT_DATA_SIZE: usize = 1024;
/// Offsets inside the Connect data (for Connect Invalid Parameters IPO).
pub const CONNECT_DATA_CNTLID_OFF: u16 = 16;
pub const CONNECT_DATA_SUBNQN_OFF: u16 = 256;
pub const CONNECT_DATA_HOSTNQN_OFF: u16 = 512;

/// Fabrics Connect data (1024 bytes of in-capsule data).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ConnectData {
    pub hostid: [u8; 16],
    pub cntlid: u16,
    pub subnqn: String,
    pub hostnqn: String,
}

/// Why Connect data could not be decoded: which field (its offset in the
/// Connect data, for IPO).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectDataError {
    #[error("connect data is {0} bytes, expected 1024")]
    Length(usize),
    #[error("subsystem NQN is not NUL-terminated UTF-8")]
    SubNqn,
    #[error("host NQN is not NUL-terminated UTF-8")]
    HostNqn,
}

impl ConnectDataError {
    /// Offset of the bad field in the Connect data.
    pub fn offset(&self) -> u16 {
        match self {
            ConnectDataError::Length(_) => 0,
            ConnectDataError::SubNqn => CONNECT_DATA_SUBNQN_OFF,
            ConnectDataError::HostNqn => CONNECT_DATA_HOSTNQN_OFF,
        }
    }
}

fn nqn_field(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0)?;
    std::str::from_utf8(&b[..end]).ok().map(str::to_owned)
}

impl ConnectData {
    pub fn parse(b: &[u8]) -> Result<ConnectData, ConnectDataError> {
        if b.len() < CONNECT_DATA_SIZE {
            return Err(ConnectDataError::Length(b.len()));
        }
        let mut hostid = [0u8; 16];
        hostid.copy_from_slice(&b[0..16]);
        Ok(ConnectData {
            hostid,
            cntlid: le16(b, 16),
            subnqn: nqn_field(&b[256..512]).ok_or(ConnectDataError::SubNqn)?,
            hostnqn: nqn_field(&b[512..768]).ok_or(ConnectDataError::HostNqn)?,
        })
    }
    /// Encode; NQNs longer than 255 bytes are truncated (NQNs are ≤ 223).
    pub fn to_bytes(&self) -> [u8; CONNECT_DATA_SIZE] {
        let mut b = [0u8; CONNECT_DATA_SIZE];
        b[0..16].copy_from_slice(&self.hostid);
        b[16..18].copy_from_slice(&self.cntlid.to_le_bytes());
        let s = self.subnqn.as_bytes();
        let n = s.len().min(255);
        b[256..256 + n].copy_from_slice(&s[..n]);
        let h = self.hostnqn.as_bytes();
        let n = h.len().min(255);
        b[512..512 + n].copy_from_slice(&h[..n]);
        b
    }
}

/// Byte offsets in Identify Controller (CNS 01h).
pub mod id_ctrl {
    pub const SIZE: usize = 4096;
    pub const VID: usize = 0;
    pub const SSVID: usize = 2;
    pub const SN: usize = 4;
    pub const MN: usize = 24;
    pub const FR: usize = 64;
    pub const RAB: usize = 72;
    pub const CMIC: usize = 76;
    pub const MDTS: usize = 77;
    pub const CNTLID: usize = 78;
    pub const VER: usize = 80;
    pub const OAES: usize = 92;
    pub const CTRATT: usize = 96;
    pub const CNTRLTYPE: usize = 111;
    pub const OACS: usize = 256;
    pub const ACL: usize = 258;
    pub const AERL: usize = 259;
    pub const FRMW: usize = 260;
    pub const LPA: usize = 261;
    pub const ELPE: usize = 262;
    pub const KAS: usize = 320;
    pub const SQES: usize = 512;
    pub const CQES: usize = 513;
    pub const MAXCMD: usize = 514;
    pub const NN: usize = 516;
    pub const ONCS: usize = 520;
    pub const VWC: usize = 525;
    pub const SGLS: usize = 536;
    pub const MNAN: usize = 540;
    pub const SUBNQN: usize = 768;
    pub const IOCCSZ: usize = 1792;
    pub const IORCSZ: usize = 1796;
    pub const ICDOFF: usize = 1800;
    pub const FCATT: usize = 1802;
    pub const MSDBD: usize = 1803;
    pub const OFCS: usize = 1804;
}

/// Byte offsets in Identify Namespace (CNS 00h).
pub mod id_ns {
    pub const SIZE: usize = 4096;
    pub const NSZE: usize = 0;
    pub const NCAP: usize = 8;
    pub const NUSE: usize = 16;
    pub const NSFEAT: usize = 24;
    pub const NLBAF: usize = 25;
    pub const FLBAS: usize = 26;
    pub const NMIC: usize = 30;
    pub const DLFEAT: usize = 33;
    pub const NSATTR: usize = 99;
    pub const NGUID: usize = 104;
    pub const EUI64: usize = 120;
    pub const LBAF0: usize = 128;
}

/// Discovery log page (70h) layout.
pub mod disc_log {
    pub const HEADER_SIZE: usize = 1024;
    pub const ENTRY_SIZE: usize = 1024;
    pub const GENCTR: usize = 0;
    pub const NUMREC: usize = 8;
    pub const RECFMT: usize = 16;
    // Entry offsets.
    pub const TRTYPE: usize = 0;
    pub const ADRFAM: usize = 1;
    pub const SUBTYPE: usize = 2;
    pub const TREQ: usize = 3;
    pub const PORTID: usize = 4;
    pub const CNTLID: usize = 6;
    pub const ASQSZ: usize = 8;
    pub const EFLAGS: usize = 10;
    pub const TRSVCID: usize = 32;
    pub const SUBNQN: usize = 256;
    pub const TRADDR: usize = 512;
    pub const TSAS: usize = 768;
    pub const TRTYPE_TCP: u8 = 3;
    pub const ADRFAM_IPV4: u8 = 1;
    pub const ADRFAM_IPV6: u8 = 2;
    pub const SUBTYPE_DISCOVERY_REFERRAL: u8 = 1;
    pub const SUBTYPE_NVME: u8 = 2;
    pub const SUBTYPE_CURRENT_DISCOVERY: u8 = 3;
    /// TREQ bits 1:0 = 2: secure channel not required.
    pub const TREQ_NOT_REQUIRED: u8 = 2;
}

/// Async event completion DW0 values.
pub mod aen {
    /// Notice, namespace attribute changed, log page 04h.
    pub const NS_CHANGED: u32 = 0x0004_0002;
    /// Notice, discovery log changed, log page 70h.
    pub const DISCOVERY_CHANGED: u32 = 0x0070_F002;
    /// Async Event Configuration bits.
    pub const CFG_NS_ATTR: u32 = 1 << 8;
    pub const CFG_DISCOVERY: u32 = 1 << 31;
}

/// Write a string space-padded into an ASCII field (SN/MN/FR).
pub fn put_ascii_padded(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    let b = s.as_bytes();
    let n = b.len().min(dst.len());
    dst[..n].copy_from_slice(&b[..n]);
}

/// Write a string NUL-padded (NQNs, TRADDR).
pub fn put_nul_padded(dst: &mut [u8], s: &str) {
    dst.fill(0);
    let b = s.as_bytes();
    let n = b.len().min(dst.len().saturating_sub(1));
    dst[..n].copy_from_slice(&b[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_encoding_matches_spec_examples() {
        assert_eq!(Status::generic(sc::INVALID_OPCODE).to_u16(), 0x8002);
        assert_eq!(Status::generic(sc::LBA_OUT_OF_RANGE).to_u16(), 0x8100);
        assert_eq!(
            Status::new(
                sct::COMMAND_SPECIFIC,
                csc::CONNECT_INVALID_PARAMETERS,
                false
            )
            .to_u16(),
            0x0304
        );
        let s = Status::new(2, 0x86, true);
        assert_eq!(Status::from_u16(s.to_u16()), s);
    }

    #[test]
    fn sqe_round_trip_and_fields() {
        let mut s = Sqe {
            opc: nvm::WRITE,
            flags: 0x40,
            cid: 0xA00F,
            nsid: 1,
            sgl: Sgl::transport(8192),
            cdw10: 0x1000,
            cdw11: 0x2,
            cdw12: (15) | (1 << 30),
            ..Default::default()
        };
        let b = s.to_bytes();
        assert_eq!(b[1], 0x40);
        assert_eq!(b[39], 0x5A);
        assert_eq!(&b[32..36], &8192u32.to_le_bytes());
        let p = Sqe::parse(&b);
        assert_eq!(p, s);
        assert_eq!(p.slba(), 0x2_0000_1000);
        assert_eq!(p.nlb(), 16);
        assert!(p.fua());
        assert_eq!(p.direction(), DataDir::HostToCtrl);
        s.opc = nvm::READ;
        assert_eq!(s.direction(), DataDir::CtrlToHost);
        s.opc = fabrics::OPCODE;
        s.nsid = fabrics::CONNECT as u32;
        assert_eq!(s.direction(), DataDir::HostToCtrl);
        s.nsid = fabrics::PROPERTY_GET as u32;
        assert_eq!(s.direction(), DataDir::None);
        s.opc = 0x03;
        assert_eq!(s.direction(), DataDir::Bidirectional);
    }

    #[test]
    fn cqe_round_trip() {
        let c = Cqe {
            dw0: 1,
            dw1: 2,
            sqhd: 3,
            sqid: 4,
            cid: 0xBEEF,
            status: Status::generic(sc::INVALID_FIELD),
        };
        let b = c.to_bytes();
        assert_eq!(&b[14..16], &0x8004u16.to_le_bytes());
        assert_eq!(Cqe::parse(&b), c);
    }

    #[test]
    fn connect_round_trip_and_errors() {
        let c = ConnectCmd {
            recfmt: 0,
            qid: 3,
            sqsize: 127,
            cattr: 4,
            kato: 5000,
        };
        let sqe = c.to_sqe(7);
        assert_eq!(ConnectCmd::from_sqe(&Sqe::parse(&sqe.to_bytes())), c);
        let d = ConnectData {
            hostid: [9; 16],
            cntlid: 0xFFFF,
            subnqn: "nqn.2016-06.io.spdk:cnode1".into(),
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:1".into(),
        };
        let b = d.to_bytes();
        assert_eq!(ConnectData::parse(&b).unwrap(), d);
        let mut bad = b;
        bad[512..768].fill(b'a');
        assert_eq!(ConnectData::parse(&bad), Err(ConnectDataError::HostNqn));
        assert_eq!(ConnectDataError::HostNqn.offset(), 512);
        assert_eq!(
            ConnectData::parse(&b[..100]),
            Err(ConnectDataError::Length(100))
        );
    }
}
