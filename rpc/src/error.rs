//! JSON-RPC error values with SPDK's codes and texts (rpc-contract.md §1.4).

use std::ffi::CStr;

use serde::Serialize;

/// `SPDK_JSONRPC_ERROR_PARSE_ERROR`
pub const PARSE_ERROR: i32 = -32700;
/// `SPDK_JSONRPC_ERROR_INVALID_REQUEST`
pub const INVALID_REQUEST: i32 = -32600;
/// `SPDK_JSONRPC_ERROR_METHOD_NOT_FOUND`
pub const METHOD_NOT_FOUND: i32 = -32601;
/// `SPDK_JSONRPC_ERROR_INVALID_PARAMS`
pub const INVALID_PARAMS: i32 = -32602;
/// `SPDK_JSONRPC_ERROR_INTERNAL_ERROR`
pub const INTERNAL_ERROR: i32 = -32603;
/// `SPDK_JSONRPC_ERROR_INVALID_STATE`
pub const INVALID_STATE: i32 = -1;

/// The `error` member of a JSON-RPC response: `{"code": .., "message": ..}`
/// (SPDK never sends `data`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{message} ({code})")]
pub struct RpcError {
    pub code: i32,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }

    /// `-errno` with glibc's `strerror` text, as SPDK's
    /// `spdk_jsonrpc_send_error_response(request, rc, spdk_strerror(-rc))`.
    /// Accepts either sign: `errno(libc::ENODEV)` and `errno(-libc::ENODEV)`
    /// both give `{-19, "No such device"}`.
    pub fn errno(errno: i32) -> Self {
        let e = errno.saturating_abs();
        RpcError::new(-e, strerror(e))
    }

    /// `-errno` with a handler-specific message (e.g. -22 "No rate limits specified").
    pub fn errno_msg(errno: i32, message: impl Into<String>) -> Self {
        RpcError::new(-errno.saturating_abs(), message)
    }

    /// -32602 with the given text (SPDK usually says "Invalid parameters").
    pub fn invalid_params(message: impl Into<String>) -> Self {
        RpcError::new(INVALID_PARAMS, message)
    }

    /// -32603 with the given text.
    pub fn internal(message: impl Into<String>) -> Self {
        RpcError::new(INTERNAL_ERROR, message)
    }

    /// -32603 "spdk_json_decode_object failed": the decode failure every bdev
    /// module RPC reports.
    pub fn decode_failed() -> Self {
        RpcError::internal("spdk_json_decode_object failed")
    }

    pub(crate) fn parse_error() -> Self {
        RpcError::new(PARSE_ERROR, "Parse error")
    }

    pub(crate) fn invalid_request() -> Self {
        RpcError::new(INVALID_REQUEST, "Invalid request")
    }

    pub(crate) fn method_not_found() -> Self {
        RpcError::new(METHOD_NOT_FOUND, "Method not found")
    }
}

/// How a method reports a params decode failure; SPDK differs per method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// -32603 "spdk_json_decode_object failed" (bdev module RPCs).
    Internal,
    /// -32602 "Invalid parameters".
    InvalidParams,
    /// -32602 "spdk_json_decode_object failed" (the error bdev's RPCs).
    ErrorBdev,
}

impl From<DecodeError> for RpcError {
    fn from(d: DecodeError) -> RpcError {
        match d {
            DecodeError::Internal => RpcError::decode_failed(),
            DecodeError::InvalidParams => RpcError::invalid_params("Invalid parameters"),
            DecodeError::ErrorBdev => RpcError::invalid_params("spdk_json_decode_object failed"),
        }
    }
}

/// glibc's text for a (positive) errno, e.g. 19 -> "No such device".
fn strerror(errno: i32) -> String {
    let mut buf = [0 as libc::c_char; 256];
    // SAFETY: `buf` is a valid writable buffer of the given length; the libc
    // crate binds `strerror_r` to the XSI variant (`__xpg_strerror_r` on glibc),
    // which writes a NUL-terminated string into it and returns 0 on success.
    let rc = unsafe { libc::strerror_r(errno, buf.as_mut_ptr(), buf.len()) };
    if rc != 0 {
        return format!("Unknown error {errno}");
    }
    // SAFETY: on success the buffer holds a NUL-terminated string (and it is
    // zero-initialised, so a terminator exists within bounds regardless).
    let s = unsafe { CStr::from_ptr(buf.as_ptr()) };
    s.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_texts_match_glibc() {
        let cases = [
            (libc::ENODEV, -19, "No such device"),
            (libc::EEXIST, -17, "File exists"),
            (libc::EINVAL, -22, "Invalid argument"),
            (libc::ENOMEM, -12, "Cannot allocate memory"),
            (libc::EBUSY, -16, "Device or resource busy"),
            (libc::ENOENT, -2, "No such file or directory"),
            (libc::ETIMEDOUT, -110, "Connection timed out"),
            (libc::EALREADY, -114, "Operation already in progress"),
            (libc::EPERM, -1, "Operation not permitted"),
        ];
        for (e, code, msg) in cases {
            assert_eq!(RpcError::errno(e), RpcError::new(code, msg));
            assert_eq!(RpcError::errno(-e), RpcError::new(code, msg));
        }
    }

    #[test]
    fn fixed_texts() {
        assert_eq!(
            RpcError::errno_msg(libc::EINVAL, "No rate limits specified"),
            RpcError::new(-22, "No rate limits specified")
        );
        assert_eq!(
            RpcError::decode_failed(),
            RpcError::new(-32603, "spdk_json_decode_object failed")
        );
        assert_eq!(
            RpcError::from(DecodeError::InvalidParams),
            RpcError::new(-32602, "Invalid parameters")
        );
        assert_eq!(
            RpcError::from(DecodeError::ErrorBdev),
            RpcError::new(-32602, "spdk_json_decode_object failed")
        );
        assert_eq!(
            RpcError::from(DecodeError::Internal),
            RpcError::decode_failed()
        );
        assert_eq!(RpcError::invalid_params("x").code, -32602);
        assert_eq!(RpcError::internal("x").code, -32603);
        assert_eq!(
            RpcError::errno(libc::ENODEV).to_string(),
            "No such device (-19)"
        );
        let v = serde_json::to_value(RpcError::errno(libc::EEXIST)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"code": -17, "message": "File exists"})
        );
    }
}
