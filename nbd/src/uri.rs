//! NBD URIs as libnbd (`nbd_connect_uri`) and QEMU read them:
//! `nbd://HOST[:PORT][/EXPORT]` and `nbd+unix:///[EXPORT]?socket=PATH`.
//! The export name is the path without its leading `/`, percent-decoded.
//! TLS (`nbds`) and vsock schemes are refused by name, anything else too.

use std::path::PathBuf;

use crate::proto::DEFAULT_PORT;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub endpoint: Endpoint,
    pub export: String,
}

fn percent_decode(s: &str, what: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in the {what} '{s}'"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("the {what} '{s}' is not UTF-8"))
}

/// Parse an NBD URI; the error says what is wrong with it.
pub fn parse(uri: &str) -> Result<NbdUri, String> {
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or_else(|| format!("'{uri}' is not an NBD URI (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)"))?;
    let unix = match scheme.to_ascii_lowercase().as_str() {
        "nbd" => false,
        "nbd+unix" => true,
        s @ ("nbds" | "nbds+unix" | "nbds+vsock") => {
            return Err(format!(
                "URI scheme '{s}' needs TLS, which this client does not support"
            ))
        }
        "nbd+vsock" => return Err("URI scheme 'nbd+vsock' (AF_VSOCK) is not supported".into()),
        s => {
            return Err(format!(
                "URI scheme '{s}' is not an NBD scheme (nbd or nbd+unix)"
            ))
        }
    };
    if rest.contains('#') {
        return Err(format!("'{uri}': fragments are not allowed in an NBD URI"));
    }
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => (&before_query[..i], &before_query[i..]),
        None => (before_query, ""),
    };
    let export = percent_decode(path.strip_prefix('/').unwrap_or(path), "export name")?;
    if export.len() > crate::proto::MAX_NAME_LEN {
        return Err("export name longer than 4096 bytes".into());
    }
    let mut socket = None;
    for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "socket" if unix => socket = Some(percent_decode(v, "socket path")?),
            "socket" => return Err("'socket=' belongs to nbd+unix:// URIs, not nbd://".into()),
            k if k.starts_with("tls") => {
                return Err(format!("URI parameter '{k}': TLS is not supported"))
            }
            k => return Err(format!("unknown URI parameter '{k}'")),
        }
    }
    let endpoint = if unix {
        if !authority.is_empty() {
            return Err(format!(
                "nbd+unix URIs have no host ('{authority}' given): nbd+unix:///EXPORT?socket=PATH"
            ));
        }
        let s = socket
            .filter(|s| !s.is_empty())
            .ok_or("nbd+unix URIs need ?socket=PATH")?;
        if s.len() > 107 {
            return Err(format!("socket path '{s}' is longer than 107 bytes"));
        }
        Endpoint::Unix(PathBuf::from(s))
    } else {
        if authority.contains('@') {
            return Err("user names are not supported in NBD URIs".into());
        }
        let (host, port) = if let Some(r) = authority.strip_prefix('[') {
            let (h, after) = r
                .split_once(']')
                .ok_or_else(|| format!("unclosed '[' in '{authority}'"))?;
            match after {
                "" => (h.to_string(), None),
                p if p.starts_with(':') => (h.to_string(), Some(&p[1..])),
                _ => return Err(format!("bad host '{authority}'")),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        let port = match port {
            None | Some("") => DEFAULT_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("port '{p}' is not a number from 1 to 65535"))?,
        };
        let host = if host.is_empty() {
            "localhost".to_string()
        } else {
            host
        };
        Endpoint::Tcp { host, port }
    };
    Ok(NbdUri { endpoint, export })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(h: &str, p: u16, e: &str) -> NbdUri {
        NbdUri {
            endpoint: Endpoint::Tcp {
                host: h.into(),
                port: p,
            },
            export: e.into(),
        }
    }

    #[test]
    fn libnbd_forms() {
        assert_eq!(
            parse("nbd://example.com").unwrap(),
            tcp("example.com", 10809, "")
        );
        assert_eq!(
            parse("nbd://127.0.0.1:10810/").unwrap(),
            tcp("127.0.0.1", 10810, "")
        );
        assert_eq!(parse("nbd://h/disk").unwrap(), tcp("h", 10809, "disk"));
        assert_eq!(parse("nbd://h//abs").unwrap(), tcp("h", 10809, "/abs"));
        assert_eq!(parse("nbd://h/a%20b").unwrap(), tcp("h", 10809, "a b"));
        assert_eq!(parse("nbd://[::1]:99/x").unwrap(), tcp("::1", 99, "x"));
        assert_eq!(parse("NBD://[::1]/x").unwrap(), tcp("::1", 10809, "x"));
        assert_eq!(parse("nbd:///x").unwrap(), tcp("localhost", 10809, "x"));
        assert_eq!(
            parse("nbd+unix:///exp?socket=/tmp/s.sock").unwrap(),
            NbdUri {
                endpoint: Endpoint::Unix("/tmp/s.sock".into()),
                export: "exp".into()
            }
        );
        assert_eq!(
            parse("nbd+unix://?socket=/tmp/s").unwrap().export,
            String::new()
        );
    }

    #[test]
    fn refusals_say_why() {
        let e = |u: &str| parse(u).unwrap_err();
        assert!(e("http://x/y").contains("not an NBD scheme"));
        assert!(e("nbds://x/y").contains("TLS"));
        assert!(e("nbd+vsock://1").contains("vsock"));
        assert!(e("/dev/nbd0").contains("not an NBD URI"));
        assert!(e("nbd://h:0/x").contains("port"));
        assert!(e("nbd://h:99999/x").contains("port"));
        assert!(e("nbd://h:abc/x").contains("port"));
        assert!(e("nbd+unix:///x").contains("socket="));
        assert!(e("nbd+unix://host/x?socket=/s").contains("no host"));
        assert!(e("nbd://h/x?socket=/s").contains("nbd+unix"));
        assert!(e("nbd://h/x?foo=1").contains("unknown URI parameter"));
        assert!(e("nbd://h/x?tls=require").contains("TLS"));
        assert!(e("nbd://h/%zz").contains("percent"));
        assert!(e("nbd://[::1/x").contains("unclosed"));
    }
}
