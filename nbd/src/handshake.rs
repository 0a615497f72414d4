//! The client side of the fixed newstyle handshake: structured replies,
//! the `base:allocation` meta context, then `NBD_OPT_GO` (falling back to
//! `NBD_OPT_EXPORT_NAME` for servers without it).

use crate::proto::{self, *};
use crate::sock::Sock;

/// What the handshake agreed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Negotiated {
    pub info: ExportInfo,
    pub structured: bool,
    /// The `base:allocation` context id, when the server offers it.
    pub meta_context: Option<u32>,
}

impl Negotiated {
    pub fn flag(&self, f: u16) -> bool {
        self.info.flags & f != 0
    }
    /// Largest read/write payload the server takes.
    pub fn max_payload(&self) -> u32 {
        match self.info.block_size {
            Some((_, _, max)) => max.min(DEFAULT_MAX_PAYLOAD),
            None => DEFAULT_MAX_PAYLOAD,
        }
    }
    pub fn min_block(&self) -> u32 {
        self.info.block_size.map_or(1, |b| b.0)
    }
}

fn io(e: std::io::Error) -> String {
    format!("connection lost during the handshake: {e}")
}

async fn reply(sock: &Sock, opt: u32) -> Result<(u32, Vec<u8>), String> {
    let mut h = [0u8; OPT_REPLY_HDR_LEN];
    sock.read_exact(&mut h).await.map_err(io)?;
    let (o, ty, len) =
        decode_option_reply_header(&h).map_err(|e| format!("bad option reply: {e}"))?;
    if o != opt {
        return Err(format!(
            "server replied to option {o} while {} was asked",
            option_name(opt)
        ));
    }
    if len > MAX_OPT_LEN {
        return Err(format!("option reply of {len} bytes is too long"));
    }
    let mut d = vec![0u8; len as usize];
    sock.read_exact(&mut d).await.map_err(io)?;
    Ok((ty, d))
}

fn err_text(opt: u32, ty: u32, d: &[u8]) -> String {
    let msg = String::from_utf8_lossy(d);
    format!(
        "server refused {} ({}){}",
        option_name(opt),
        reply_error_name(ty),
        if msg.is_empty() {
            String::new()
        } else {
            format!(": {msg}")
        }
    )
}

/// Run the handshake on a connected socket, for `export`.
pub async fn handshake(sock: &Sock, export: &str) -> Result<Negotiated, String> {
    let mut g = [0u8; 18];
    sock.read_exact(&mut g).await.map_err(io)?;
    let flags = decode_greeting(&g).map_err(|e| format!("not an NBD server: {e}"))?;
    let no_zeroes = flags & FLAG_NO_ZEROES != 0;
    let cflags = CFLAG_FIXED_NEWSTYLE | if no_zeroes { CFLAG_NO_ZEROES } else { 0 };
    sock.write_all(&cflags.to_be_bytes()).await.map_err(io)?;
    let mut n = Negotiated::default();

    sock.write_all(&encode_option(OPT_STRUCTURED_REPLY, &[]))
        .await
        .map_err(io)?;
    let (ty, _) = reply(sock, OPT_STRUCTURED_REPLY).await?;
    n.structured = ty == REP_ACK;

    if n.structured {
        let q = encode_meta_context(export, &[BASE_ALLOCATION]);
        sock.write_all(&encode_option(OPT_SET_META_CONTEXT, &q))
            .await
            .map_err(io)?;
        loop {
            let (ty, d) = reply(sock, OPT_SET_META_CONTEXT).await?;
            match ty {
                REP_META_CONTEXT if d.len() >= 4 => {
                    if &d[4..] == BASE_ALLOCATION.as_bytes() {
                        n.meta_context = Some(u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
                    }
                }
                REP_ACK => break,
                t if t & (1 << 31) != 0 => break,
                t => return Err(format!("unexpected reply {t} to NBD_OPT_SET_META_CONTEXT")),
            }
        }
    }

    sock.write_all(&encode_option(
        OPT_GO,
        &encode_go(export, &[INFO_BLOCK_SIZE]),
    ))
    .await
    .map_err(io)?;
    let mut have_export = false;
    loop {
        let (ty, d) = reply(sock, OPT_GO).await?;
        match ty {
            REP_INFO => {
                proto::decode_info(&d, &mut n.info).map_err(|e| e.to_string())?;
                if d.len() >= 2 && u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT {
                    have_export = true;
                }
            }
            REP_ACK => break,
            REP_ERR_UNSUP => {
                // An old server: the export name option ends the handshake.
                sock.write_all(&encode_option(OPT_EXPORT_NAME, export.as_bytes()))
                    .await
                    .map_err(io)?;
                let mut b = vec![0u8; if no_zeroes { 10 } else { 134 }];
                sock.read_exact(&mut b).await.map_err(|e| {
                    format!("server closed after NBD_OPT_EXPORT_NAME (no export '{export}'?): {e}")
                })?;
                n.info.size = u64::from_be_bytes(b[..8].try_into().unwrap_or([0; 8]));
                n.info.flags = u16::from_be_bytes([b[8], b[9]]);
                // Without GO no meta context or structured reply is in force.
                n.structured = false;
                n.meta_context = None;
                have_export = true;
                break;
            }
            t if t & (1 << 31) != 0 => {
                return Err(format!("export '{export}': {}", err_text(OPT_GO, t, &d)))
            }
            _ => {}
        }
    }
    if !have_export {
        return Err("server ended NBD_OPT_GO without NBD_INFO_EXPORT".into());
    }
    if n.info.flags & TF_HAS_FLAGS == 0 {
        n.info.flags = TF_HAS_FLAGS;
    }
    Ok(n)
}
