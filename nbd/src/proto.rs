//! The NBD wire protocol (the NBD project's `doc/proto.md`): constants,
//! and pure encoders/decoders for both ends. Fixed newstyle handshake only
//! (oldstyle is refused), options, simple and structured replies, and the
//! `base:allocation` meta context. No I/O here: the client and server feed
//! these with bytes, which also makes them fuzzable.

use thiserror::Error;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
pub const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const CFLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CFLAG_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_ROTATIONAL: u16 = 1 << 4;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
pub const BASE_ALLOCATION: &str = "base:allocation";

/// NBD error values (errno numbers on the wire are these, not the host's).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

pub const DEFAULT_PORT: u16 = 10809;
/// Largest payload a peer must accept when nothing else was agreed.
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;
/// Longest option payload the server accepts (names are at most 4 KiB).
pub const MAX_OPT_LEN: u32 = 64 << 10;
pub const MAX_NAME_LEN: usize = 4096;

pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_REPLY_LEN: usize = 20;
pub const OPT_HDR_LEN: usize = 16;
pub const OPT_REPLY_HDR_LEN: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtoError {
    #[error("bad magic {0:#x}")]
    Magic(u64),
    #[error("{0}")]
    Invalid(String),
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "unknown option",
    }
}

pub fn reply_error_name(t: u32) -> &'static str {
    match t {
        REP_ERR_UNSUP => "unsupported",
        REP_ERR_POLICY => "refused by policy",
        REP_ERR_INVALID => "invalid",
        REP_ERR_PLATFORM => "not supported on this platform",
        REP_ERR_TLS_REQD => "TLS required",
        REP_ERR_UNKNOWN => "unknown export",
        REP_ERR_SHUTDOWN => "server shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "block size required",
        REP_ERR_TOO_BIG => "too big",
        _ => "error",
    }
}

/// The server's greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn encode_greeting(flags: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Decode the server's greeting; its handshake flags.
pub fn decode_greeting(b: &[u8; 18]) -> Result<u16, ProtoError> {
    let m = be64(b, 0);
    if m != NBDMAGIC {
        return Err(ProtoError::Magic(m));
    }
    let o = be64(b, 8);
    if o == OLDSTYLE_MAGIC {
        return Err(ProtoError::Invalid(
            "the server speaks the oldstyle handshake (only fixed newstyle is supported)".into(),
        ));
    }
    if o != IHAVEOPT {
        return Err(ProtoError::Magic(o));
    }
    let flags = be16(b, 16);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::Invalid(
            "the server does not offer the fixed newstyle handshake".into(),
        ));
    }
    Ok(flags)
}

/// A client option request: header then payload.
pub fn encode_option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(OPT_HDR_LEN + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// An option request header: (option, payload length).
pub fn decode_option_header(b: &[u8; OPT_HDR_LEN]) -> Result<(u32, u32), ProtoError> {
    let m = be64(b, 0);
    if m != IHAVEOPT {
        return Err(ProtoError::Magic(m));
    }
    Ok((be32(b, 8), be32(b, 12)))
}

/// An option reply: header then payload.
pub fn encode_option_reply(opt: u32, ty: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(OPT_REPLY_HDR_LEN + data.len());
    b.extend_from_slice(&REPLY_MAGIC_OPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&ty.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// An option reply header: (option, reply type, payload length).
pub fn decode_option_reply_header(
    b: &[u8; OPT_REPLY_HDR_LEN],
) -> Result<(u32, u32, u32), ProtoError> {
    let m = be64(b, 0);
    if m != REPLY_MAGIC_OPT {
        return Err(ProtoError::Magic(m));
    }
    Ok((be32(b, 8), be32(b, 12), be32(b, 16)))
}

/// `NBD_OPT_GO` / `NBD_OPT_INFO` payload: export name and info requests.
pub fn encode_go(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

fn take_name(d: &[u8], at: &mut usize, what: &str) -> Result<String, ProtoError> {
    if d.len() < *at + 4 {
        return Err(ProtoError::Invalid(format!("{what}: truncated length")));
    }
    let n = be32(d, *at) as usize;
    *at += 4;
    if n > MAX_NAME_LEN || d.len() < *at + n {
        return Err(ProtoError::Invalid(format!("{what}: bad length {n}")));
    }
    let s = std::str::from_utf8(&d[*at..*at + n])
        .map_err(|_| ProtoError::Invalid(format!("{what}: not UTF-8")))?;
    *at += n;
    Ok(s.to_string())
}

/// Decode a GO/INFO payload: (export name, info requests).
pub fn decode_go(d: &[u8]) -> Result<(String, Vec<u16>), ProtoError> {
    let mut at = 0;
    let name = take_name(d, &mut at, "export name")?;
    if d.len() < at + 2 {
        return Err(ProtoError::Invalid(
            "truncated information request count".into(),
        ));
    }
    let n = be16(d, at) as usize;
    at += 2;
    if d.len() != at + 2 * n {
        return Err(ProtoError::Invalid(format!(
            "{n} information requests do not match the option length"
        )));
    }
    let infos = (0..n).map(|i| be16(d, at + 2 * i)).collect();
    Ok((name, infos))
}

/// SET/LIST_META_CONTEXT payload.
pub fn encode_meta_context(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

/// Decode a SET/LIST_META_CONTEXT payload: (export name, queries).
pub fn decode_meta_context(d: &[u8]) -> Result<(String, Vec<String>), ProtoError> {
    let mut at = 0;
    let name = take_name(d, &mut at, "export name")?;
    if d.len() < at + 4 {
        return Err(ProtoError::Invalid("truncated query count".into()));
    }
    let n = be32(d, at) as usize;
    at += 4;
    let mut q = Vec::new();
    for _ in 0..n {
        q.push(take_name(d, &mut at, "meta context query")?);
    }
    if at != d.len() {
        return Err(ProtoError::Invalid(
            "meta context queries do not match the option length".into(),
        ));
    }
    Ok((name, q))
}

/// What `NBD_INFO_EXPORT` / `NBD_INFO_BLOCK_SIZE` told the client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    /// (minimum, preferred, maximum) when the server sent them.
    pub block_size: Option<(u32, u32, u32)>,
}

pub fn encode_info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

pub fn encode_info_block_size(min: u32, pref: u32, max: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&min.to_be_bytes());
    b.extend_from_slice(&pref.to_be_bytes());
    b.extend_from_slice(&max.to_be_bytes());
    b
}

/// Fold one `NBD_REP_INFO` payload into `info` (unknown types ignored, as
/// the protocol asks).
pub fn decode_info(d: &[u8], info: &mut ExportInfo) -> Result<(), ProtoError> {
    if d.len() < 2 {
        return Err(ProtoError::Invalid(
            "NBD_REP_INFO shorter than its type".into(),
        ));
    }
    match be16(d, 0) {
        INFO_EXPORT => {
            if d.len() != 12 {
                return Err(ProtoError::Invalid(format!(
                    "NBD_INFO_EXPORT of {} bytes (12 expected)",
                    d.len()
                )));
            }
            info.size = be64(d, 2);
            info.flags = be16(d, 10);
        }
        INFO_BLOCK_SIZE => {
            if d.len() != 14 {
                return Err(ProtoError::Invalid(format!(
                    "NBD_INFO_BLOCK_SIZE of {} bytes (14 expected)",
                    d.len()
                )));
            }
            let (min, pref, max) = (be32(d, 2), be32(d, 6), be32(d, 10));
            if min == 0 || !min.is_power_of_two() || min > 65536 || pref < min || max < min {
                return Err(ProtoError::Invalid(format!(
                    "inconsistent block sizes: minimum {min}, preferred {pref}, maximum {max}"
                )));
            }
            info.block_size = Some((min, pref, max));
        }
        _ => {}
    }
    Ok(())
}

/// A transmission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub ty: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.ty.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
        let m = be32(b, 0);
        if m != REQUEST_MAGIC {
            return Err(ProtoError::Magic(m as u64));
        }
        Ok(Request {
            flags: be16(b, 4),
            ty: be16(b, 6),
            cookie: be64(b, 8),
            offset: be64(b, 16),
            length: be32(b, 24),
        })
    }
}

pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

pub fn encode_structured_header(
    flags: u16,
    ty: u16,
    cookie: u64,
    len: u32,
) -> [u8; STRUCTURED_REPLY_LEN] {
    let mut b = [0u8; STRUCTURED_REPLY_LEN];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&ty.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A structured `NBD_REPLY_TYPE_ERROR` chunk (header and payload).
pub fn encode_structured_error(cookie: u64, error: u32, msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    let mut b = Vec::with_capacity(STRUCTURED_REPLY_LEN + 6 + msg.len());
    b.extend_from_slice(&encode_structured_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    ));
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

/// The header of a transmission reply, either kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Structured {
        flags: u16,
        ty: u16,
        cookie: u64,
        length: u32,
    },
}

/// The magic says which header follows and how long it is.
pub fn reply_header_len(magic: u32) -> Result<usize, ProtoError> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
        STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_REPLY_LEN),
        m => Err(ProtoError::Magic(m as u64)),
    }
}

/// Decode a reply header of the length [`reply_header_len`] gave.
pub fn decode_reply_header(b: &[u8]) -> Result<ReplyHeader, ProtoError> {
    if b.len() < 4 {
        return Err(ProtoError::Invalid("truncated reply".into()));
    }
    let magic = be32(b, 0);
    let need = reply_header_len(magic)?;
    if b.len() < need {
        return Err(ProtoError::Invalid("truncated reply header".into()));
    }
    Ok(if magic == SIMPLE_REPLY_MAGIC {
        ReplyHeader::Simple {
            error: be32(b, 4),
            cookie: be64(b, 8),
        }
    } else {
        ReplyHeader::Structured {
            flags: be16(b, 4),
            ty: be16(b, 6),
            cookie: be64(b, 8),
            length: be32(b, 16),
        }
    })
}

/// A structured chunk's payload, decoded (OFFSET_DATA is handled by the
/// caller, which reads its data straight into the I/O buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    None,
    Hole {
        offset: u64,
        length: u32,
    },
    BlockStatus {
        context: u32,
        extents: Vec<(u32, u32)>,
    },
    Error {
        error: u32,
        offset: Option<u64>,
        message: String,
    },
}

/// Decode a non-data chunk payload of type `ty`.
pub fn decode_chunk(ty: u16, d: &[u8]) -> Result<Chunk, ProtoError> {
    match ty {
        REPLY_TYPE_NONE => {
            if !d.is_empty() {
                return Err(ProtoError::Invalid(
                    "NBD_REPLY_TYPE_NONE with a payload".into(),
                ));
            }
            Ok(Chunk::None)
        }
        REPLY_TYPE_OFFSET_HOLE => {
            if d.len() != 12 {
                return Err(ProtoError::Invalid(format!(
                    "NBD_REPLY_TYPE_OFFSET_HOLE of {} bytes",
                    d.len()
                )));
            }
            let length = be32(d, 8);
            if length == 0 {
                return Err(ProtoError::Invalid(
                    "empty NBD_REPLY_TYPE_OFFSET_HOLE".into(),
                ));
            }
            Ok(Chunk::Hole {
                offset: be64(d, 0),
                length,
            })
        }
        REPLY_TYPE_BLOCK_STATUS => {
            if d.len() < 12 || !(d.len() - 4).is_multiple_of(8) {
                return Err(ProtoError::Invalid(format!(
                    "NBD_REPLY_TYPE_BLOCK_STATUS of {} bytes",
                    d.len()
                )));
            }
            let extents = d[4..]
                .chunks_exact(8)
                .map(|e| (be32(e, 0), be32(e, 4)))
                .collect();
            Ok(Chunk::BlockStatus {
                context: be32(d, 0),
                extents,
            })
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            if d.len() < 6 {
                return Err(ProtoError::Invalid("truncated error chunk".into()));
            }
            let error = be32(d, 0);
            let mlen = be16(d, 4) as usize;
            let extra = if ty == REPLY_TYPE_ERROR_OFFSET { 8 } else { 0 };
            if d.len() != 6 + mlen + extra {
                return Err(ProtoError::Invalid("error chunk length mismatch".into()));
            }
            if error == 0 {
                return Err(ProtoError::Invalid("error chunk with error 0".into()));
            }
            let message = String::from_utf8_lossy(&d[6..6 + mlen]).into_owned();
            let offset = (extra == 8).then(|| be64(d, 6 + mlen));
            Ok(Chunk::Error {
                error,
                offset,
                message,
            })
        }
        t if t & (1 << 15) != 0 => {
            // An unknown error type: the first 6 bytes still hold the error.
            if d.len() < 4 {
                return Err(ProtoError::Invalid("truncated error chunk".into()));
            }
            Ok(Chunk::Error {
                error: be32(d, 0).max(1),
                offset: None,
                message: String::new(),
            })
        }
        t => Err(ProtoError::Invalid(format!("unknown reply chunk type {t}"))),
    }
}

/// Map a bdev completion to the NBD error sent back.
pub fn errno_of(st: bdev::IoStatus) -> u32 {
    match st {
        bdev::IoStatus::Success => 0,
        bdev::IoStatus::NoMem => ENOMEM,
        _ => EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_roundtrip_and_refusals() {
        let g = encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(decode_greeting(&g).unwrap(), 3);
        let mut old = g;
        old[8..16].copy_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        assert!(decode_greeting(&old)
            .unwrap_err()
            .to_string()
            .contains("oldstyle"));
        let g0 = encode_greeting(0);
        assert!(decode_greeting(&g0).is_err());
        let mut bad = g;
        bad[0] ^= 1;
        assert!(matches!(decode_greeting(&bad), Err(ProtoError::Magic(_))));
    }

    #[test]
    fn request_roundtrip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            ty: CMD_WRITE,
            cookie: 0xdead_beef_0000_0001,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        let mut b = r.encode();
        b[0] = 0;
        assert!(Request::decode(&b).is_err());
    }

    #[test]
    fn go_and_meta_context_roundtrip() {
        let b = encode_go("disk", &[INFO_BLOCK_SIZE]);
        assert_eq!(
            decode_go(&b).unwrap(),
            ("disk".into(), vec![INFO_BLOCK_SIZE])
        );
        assert!(decode_go(&b[..b.len() - 1]).is_err());
        let m = encode_meta_context("", &[BASE_ALLOCATION]);
        assert_eq!(
            decode_meta_context(&m).unwrap(),
            (String::new(), vec![BASE_ALLOCATION.to_string()])
        );
        assert!(decode_meta_context(&m[..m.len() - 2]).is_err());
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_go(&huge).is_err());
    }

    #[test]
    fn info_decoding() {
        let mut i = ExportInfo::default();
        decode_info(
            &encode_info_export(1 << 30, TF_HAS_FLAGS | TF_READ_ONLY),
            &mut i,
        )
        .unwrap();
        decode_info(&encode_info_block_size(512, 4096, 1 << 25), &mut i).unwrap();
        assert_eq!(i.size, 1 << 30);
        assert_eq!(i.flags, 3);
        assert_eq!(i.block_size, Some((512, 4096, 1 << 25)));
        assert!(decode_info(&encode_info_block_size(3, 4096, 1 << 25), &mut i).is_err());
        assert!(decode_info(&encode_info_block_size(4096, 512, 1 << 25), &mut i).is_err());
        assert!(decode_info(&[0, 0, 1], &mut i).is_err());
        // Unknown info types are ignored.
        decode_info(&[0, 99, 1, 2, 3], &mut i).unwrap();
    }

    #[test]
    fn chunks() {
        let e = encode_structured_error(7, EIO, "boom");
        let h = decode_reply_header(&e).unwrap();
        let ReplyHeader::Structured {
            ty,
            length,
            cookie,
            flags,
        } = h
        else {
            panic!("{h:?}")
        };
        assert_eq!((cookie, flags), (7, REPLY_FLAG_DONE));
        let c = decode_chunk(ty, &e[STRUCTURED_REPLY_LEN..][..length as usize]).unwrap();
        assert_eq!(
            c,
            Chunk::Error {
                error: EIO,
                offset: None,
                message: "boom".into()
            }
        );
        let mut bs = 1u32.to_be_bytes().to_vec();
        bs.extend_from_slice(&4096u32.to_be_bytes());
        bs.extend_from_slice(&STATE_HOLE.to_be_bytes());
        assert_eq!(
            decode_chunk(REPLY_TYPE_BLOCK_STATUS, &bs).unwrap(),
            Chunk::BlockStatus {
                context: 1,
                extents: vec![(4096, STATE_HOLE)]
            }
        );
        assert!(decode_chunk(REPLY_TYPE_BLOCK_STATUS, &bs[..10]).is_err());
        assert!(decode_chunk(REPLY_TYPE_OFFSET_HOLE, &[0; 11]).is_err());
        assert!(decode_chunk(77, &[]).is_err());
        let s = encode_simple_reply(0, 9);
        assert_eq!(
            decode_reply_header(&s).unwrap(),
            ReplyHeader::Simple {
                error: 0,
                cookie: 9
            }
        );
        assert!(reply_header_len(0x1234).is_err());
    }
}
