//! Entry points shared by the cargo-fuzz targets (`nbd/fuzz/`) and the
//! stable replay test (`tests/fuzz_replay.rs`). None may panic, whatever
//! the bytes.

use crate::proto::*;

/// What a server parses: option requests (header + payload) during the
/// handshake, then transmission requests with their write payloads, and
/// the checks made before any I/O.
pub fn server_stream(data: &[u8]) {
    let Some((&sel, mut rest)) = data.split_first() else {
        return;
    };
    while rest.len() >= OPT_HDR_LEN {
        let h: &[u8; OPT_HDR_LEN] = rest[..OPT_HDR_LEN].try_into().expect("length checked");
        let Ok((opt, len)) = decode_option_header(h) else {
            break;
        };
        rest = &rest[OPT_HDR_LEN..];
        if len > MAX_OPT_LEN || len as usize > rest.len() {
            break;
        }
        let d = &rest[..len as usize];
        rest = &rest[len as usize..];
        match opt {
            OPT_GO | OPT_INFO => {
                if let Ok((name, _)) = decode_go(d) {
                    assert!(name.len() <= MAX_NAME_LEN);
                }
            }
            OPT_SET_META_CONTEXT | OPT_LIST_META_CONTEXT => {
                let _ = decode_meta_context(d);
            }
            _ => {}
        }
    }
    let bs = 512u64 << (sel & 3);
    let size = bs * 1024;
    while rest.len() >= REQUEST_LEN {
        let h: &[u8; REQUEST_LEN] = rest[..REQUEST_LEN].try_into().expect("length checked");
        rest = &rest[REQUEST_LEN..];
        let Ok(r) = Request::decode(h) else { break };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
        if let Some(e) = crate::server::check_request(&r, sel & 4 != 0, sel & 8 != 0, size, bs) {
            assert!(e != 0);
        } else if r.ty != CMD_FLUSH {
            // Accepted: aligned and inside the export.
            assert!(r.offset.is_multiple_of(bs) && (r.length as u64).is_multiple_of(bs));
            assert!(r.offset + r.length as u64 <= size);
        }
        if r.ty == CMD_WRITE {
            let n = (r.length as usize).min(rest.len());
            rest = &rest[n..];
        }
    }
}

/// What a client parses: reply headers and non-data chunks, and the
/// block-status conversion to whole blocks.
pub fn client_stream(data: &[u8]) {
    let Some((&sel, mut rest)) = data.split_first() else {
        return;
    };
    let bs = 512u64 << (sel & 3);
    while rest.len() >= 4 {
        let magic = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let Ok(hl) = reply_header_len(magic) else {
            break;
        };
        if rest.len() < hl {
            break;
        }
        let Ok(h) = decode_reply_header(&rest[..hl]) else {
            break;
        };
        rest = &rest[hl..];
        if let ReplyHeader::Structured { ty, length, .. } = h {
            let n = (length as usize).min(rest.len());
            let d = &rest[..n];
            rest = &rest[n..];
            if let Ok(Chunk::BlockStatus { extents, .. }) = decode_chunk(ty, d) {
                let max = (sel as u64 + 1) * bs * 3;
                let e = crate::client::to_block_extents(&extents, bs, max);
                let total: u64 = e.iter().map(|x| x.num_blocks).sum();
                assert!(total * bs <= max);
                assert!(e.iter().all(|x| x.num_blocks > 0));
            }
        }
    }
    let mut info = ExportInfo::default();
    let _ = decode_info(rest, &mut info);
}
