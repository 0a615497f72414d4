//! Crate-level tests: dispatch, strict decoding, states, builtins, the config
//! loader (driven with a tiny block_on), and the socket server on a real
//! reactor runtime.

use std::future::Future;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::json::{process_value, take_values};
use crate::*;

/// Tests touching the global state or the reactor runtime run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    reactor::sync::lock(&SERIAL)
}

/// Run a future to completion on this thread (handlers used here do not
/// need a reactor).
fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// Feed raw request bytes through framing + envelope + dispatch.
fn wire(bytes: &str) -> Option<Value> {
    let mut buf = bytes.as_bytes().to_vec();
    let framed = take_values(&mut buf, true);
    assert!(!framed.parse_error, "parse error in {bytes}");
    assert_eq!(framed.values.len(), 1);
    let out = block_on(process_value(framed.values.into_iter().next().unwrap()))?;
    assert_eq!(out.last(), Some(&b'\n'));
    Some(serde_json::from_slice(&out).unwrap())
}

fn err(code: i32, msg: &str) -> Result<Value, RpcError> {
    Err(RpcError::new(code, msg))
}

/// Call each method with its params in turn and check its reply; a
/// mismatch names the step and the method.
fn expect_calls(steps: &[(&str, Option<Value>, Result<Value, RpcError>)]) {
    for (i, (method, params, want)) in steps.iter().enumerate() {
        assert_eq!(
            &block_on(call(method, params.clone())),
            want,
            "step {i}: {method}"
        );
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct TypedParams {
    name: String,
    #[serde(default)]
    flag: bool,
    count: Option<u32>,
    size: Option<u64>,
}

fn register_test_methods() {
    register_typed(
        "test_typed",
        RUNTIME,
        DecodeError::Internal,
        |p: TypedParams| async move {
            Ok(json!({"name": p.name, "flag": p.flag, "count": p.count, "size": p.size}))
        },
    );
    register_typed(
        "test_typed_ip",
        RUNTIME,
        DecodeError::InvalidParams,
        |p: TypedParams| async move { Ok(p.name) },
    );
    register_typed(
        "test_typed_eb",
        RUNTIME,
        DecodeError::ErrorBdev,
        |p: TypedParams| async move { Ok(p.name) },
    );
    register("test_raw", STARTUP | RUNTIME, |params| {
        Box::pin(async move { Ok(json!({ "params": params })) })
    });
    register("test_fail", STARTUP | RUNTIME, |_| {
        Box::pin(async move { Err(RpcError::errno(libc::ENODEV)) })
    });
    register("test_startup_only", STARTUP, |_| {
        Box::pin(async { Ok(json!(true)) })
    });
    register("test_runtime_only", RUNTIME, |_| {
        Box::pin(async { Ok(json!(true)) })
    });
    register_alias("test_alias_of_raw", "test_raw");
    register_builtin_methods();
}

#[test]
fn strict_typed_decoding() {
    let _g = serial();
    register_test_methods();
    set_state(RUNTIME);
    let call = |p: Option<Value>| block_on(call("test_typed", p));
    let decode = err(-32603, "spdk_json_decode_object failed");

    assert_eq!(
        call(Some(json!({"name": "a", "flag": false}))),
        Ok(json!({"name": "a", "flag": false, "count": null, "size": null}))
    );
    assert_eq!(
        call(Some(
            json!({"name": "a", "flag": true, "count": 7, "size": 18446744073709551615u64})
        )),
        Ok(json!({"name": "a", "flag": true, "count": 7, "size": 18446744073709551615u64}))
    );
    // Absent params decode as {}: the required `name` is missing.
    assert_eq!(call(None), decode);
    assert_eq!(call(Some(json!({}))), decode);
    // Unknown key, wrong types, negative / exponent / fractional unsigned.
    assert_eq!(call(Some(json!({"name": "a", "bogus": 1}))), decode);
    assert_eq!(call(Some(json!({"name": 5}))), decode);
    assert_eq!(call(Some(json!({"name": null}))), decode);
    assert_eq!(call(Some(json!({"name": "a", "flag": "true"}))), decode);
    assert_eq!(call(Some(json!({"name": "a", "flag": 1}))), decode);
    assert_eq!(call(Some(json!({"name": "a", "count": -1}))), decode);
    assert_eq!(
        call(Some(json!({"name": "a", "count": 4294967296u64}))),
        decode
    );
    assert_eq!(call(Some(json!({"name": "a", "count": 1.5}))), decode);
    assert_eq!(call(Some(json!({"name": "a", "count": "5"}))), decode);
    // Params must be an object.
    assert_eq!(call(Some(json!(["a"]))), decode);

    // Exponent forms and duplicate keys, as they arrive on the wire.
    let resp =
        wire(r#"{"jsonrpc":"2.0","id":1,"method":"test_typed","params":{"name":"a","count":1e3}}"#);
    assert_eq!(
        resp.unwrap()["error"],
        json!({"code": -32603, "message": "spdk_json_decode_object failed"})
    );
    let resp =
        wire(r#"{"jsonrpc":"2.0","id":1,"method":"test_typed","params":{"name":"a","name":"b"}}"#);
    assert_eq!(resp.unwrap()["error"]["code"], json!(-32603));
    let resp = wire(
        r#"{"jsonrpc":"2.0","id":1,"method":"test_typed","params":{"name":"a","flag":false}}"#,
    );
    assert_eq!(resp.unwrap()["result"]["name"], json!("a"));

    // The other decode-error conventions.
    assert_eq!(
        block_on(crate::call("test_typed_ip", None)),
        err(-32602, "Invalid parameters")
    );
    assert_eq!(
        block_on(crate::call("test_typed_eb", Some(json!({"x": 1})))),
        err(-32602, "spdk_json_decode_object failed")
    );
}

#[test]
fn states_and_unknown_methods() {
    let _g = serial();
    register_test_methods();
    let before_init =
        "Method may only be called after framework is initialized using framework_start_init RPC.";
    let after_init = "Method may only be called before framework is initialized. Use --wait-for-rpc command line parameter and then issue this RPC before the framework_start_init RPC.";
    set_state(STARTUP);
    expect_calls(&[
        ("no_such_method", None, err(-32601, "Method not found")),
        ("test_runtime_only", None, err(-1, before_init)),
        ("test_startup_only", None, Ok(json!(true))),
    ]);
    set_state(RUNTIME);
    expect_calls(&[
        ("test_startup_only", None, err(-1, after_init)),
        ("test_runtime_only", None, Ok(json!(true))),
        // Aliases dispatch to their target; null params count as absent.
        (
            "test_alias_of_raw",
            Some(Value::Null),
            Ok(json!({"params": null})),
        ),
        ("test_fail", None, err(-19, "No such device")),
    ]);
}

#[test]
fn envelope_and_notifications_through_dispatch() {
    let _g = serial();
    register_test_methods();
    set_state(RUNTIME);
    // Success of a notification is suppressed (id absent or null, as SPDK).
    assert_eq!(wire(r#"{"method":"test_raw"}"#), None);
    assert_eq!(wire(r#"{"method":"test_raw","id":null}"#), None);
    // Errors of notifications are sent with id null.
    assert_eq!(
        wire(r#"{"method":"test_fail"}"#),
        Some(json!({"jsonrpc":"2.0","id":null,"error":{"code":-19,"message":"No such device"}}))
    );
    assert_eq!(
        wire(r#"{"jsonrpc":"2.0","method":"nope","id":"abc"}"#),
        Some(
            json!({"jsonrpc":"2.0","id":"abc","error":{"code":-32601,"message":"Method not found"}})
        )
    );
    assert_eq!(
        wire(r#"{"jsonrpc":"1.0","method":"test_raw","id":3}"#),
        Some(
            json!({"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Invalid request"}})
        )
    );
    // Params given as an array reach raw handlers unchanged.
    assert_eq!(
        wire(r#"{"method":"test_raw","id":4,"params":[1,2]}"#),
        Some(json!({"jsonrpc":"2.0","id":4,"result":{"params":[1,2]}}))
    );
    // Batches: one array back, notifications leave no entry, order kept.
    assert_eq!(
        wire(
            r#"[{"method":"test_raw","id":1},{"method":"test_raw"},{"method":"test_fail","id":2},5]"#
        ),
        Some(json!([
            {"jsonrpc":"2.0","id":1,"result":{"params":null}},
            {"jsonrpc":"2.0","id":2,"error":{"code":-19,"message":"No such device"}},
            {"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Invalid request"}}
        ]))
    );
    assert_eq!(
        wire("[]"),
        Some(
            json!({"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Invalid request"}})
        )
    );
    assert_eq!(wire(r#"[{"method":"test_raw"}]"#), None);
}

#[test]
fn builtin_methods() {
    let _g = serial();
    register_test_methods();
    set_state(STARTUP);

    assert_eq!(
        block_on(call("spdk_get_version", None)),
        Ok(
            json!({"version":"SPDK v26.09-pre","fields":{"major":26,"minor":9,"patch":0,"suffix":"-pre"}})
        )
    );
    assert_eq!(
        block_on(call("spdk_get_version", Some(json!({})))),
        err(-32602, "spdk_get_version method requires no parameters")
    );

    // rpc_get_methods: `current` filters by state, aliases only on request.
    let names = |p: Value| -> Vec<String> {
        serde_json::from_value(block_on(call("rpc_get_methods", Some(p))).unwrap()).unwrap()
    };
    let all = names(json!({}));
    assert!(all.contains(&"test_runtime_only".to_string()));
    assert!(all.contains(&"spdk_get_version".to_string()));
    assert!(!all.contains(&"test_alias_of_raw".to_string()));
    let current = names(json!({"current": true, "include_aliases": false}));
    assert!(!current.contains(&"test_runtime_only".to_string()));
    assert!(current.contains(&"test_startup_only".to_string()));
    assert!(current.contains(&"rpc_get_methods".to_string()));
    assert!(names(json!({"include_aliases": true})).contains(&"test_alias_of_raw".to_string()));
    assert_eq!(
        block_on(call("rpc_get_methods", Some(json!({"current": 1})))),
        err(-32602, "Invalid parameters")
    );
    assert_eq!(method_names(false, false), all);

    // framework_* are RUNTIME only.
    assert_eq!(
        block_on(call("framework_get_subsystems", None))
            .unwrap_err()
            .code,
        -1
    );
    set_state(RUNTIME);

    register_subsystem("t_nvmf", &["t_bdev"], || vec![json!({"method": "n1"})]);
    register_subsystem("t_bdev", &["t_accel"], || {
        vec![
            json!({"method": "b1", "params": {"x": 1}}),
            json!([{"method": "b2"}, {"method": "b3"}]),
        ]
    });
    register_subsystem("t_accel", &[], Vec::new);
    let subs = block_on(call("framework_get_subsystems", None)).unwrap();
    let ours: Vec<&Value> = subs
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["subsystem"].as_str().unwrap().starts_with("t_"))
        .collect();
    // Dependencies come first; otherwise registration order.
    assert_eq!(
        ours,
        vec![
            &json!({"subsystem": "t_accel", "depends_on": []}),
            &json!({"subsystem": "t_bdev", "depends_on": ["t_accel"]}),
            &json!({"subsystem": "t_nvmf", "depends_on": ["t_bdev"]}),
        ]
    );
    assert_eq!(
        block_on(call("framework_get_subsystems", Some(json!({})))),
        err(-32602, "'framework_get_subsystems' requires no arguments")
    );

    assert_eq!(
        block_on(call(
            "framework_get_config",
            Some(json!({"name": "t_bdev"}))
        )),
        Ok(json!([{"method": "b1", "params": {"x": 1}}, {"method": "b2"}, {"method": "b3"}]))
    );
    assert_eq!(
        block_on(call(
            "framework_get_config",
            Some(json!({"name": "t_bdev", "with_batches": true}))
        )),
        Ok(json!([{"method": "b1", "params": {"x": 1}}, [{"method": "b2"}, {"method": "b3"}]]))
    );
    assert_eq!(
        block_on(call(
            "framework_get_config",
            Some(json!({"name": "t_accel"}))
        )),
        Ok(json!([]))
    );
    assert_eq!(
        block_on(call("framework_get_config", Some(json!({"name": "nope"})))),
        err(-32602, "Subsystem 'nope' not found")
    );
    assert_eq!(
        block_on(call("framework_get_config", None)),
        err(-32602, "Invalid arguments")
    );
}

static LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn log(s: impl Into<String>) {
    reactor::sync::lock(&LOG).push(s.into());
}

fn take_log() -> Vec<String> {
    std::mem::take(&mut *reactor::sync::lock(&LOG))
}

fn register_loader_methods() {
    register_subsystem("ldr", &[], Vec::new);
    for (name, mask) in [
        ("ldr_startup", STARTUP),
        ("ldr_both", STARTUP | RUNTIME),
        ("ldr_runtime", RUNTIME),
    ] {
        register(name, mask, move |params| {
            Box::pin(async move {
                let tag = params
                    .as_ref()
                    .and_then(|p| p.get("tag"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("-")
                    .to_string();
                log(format!("{name}:{tag}"));
                if tag == "fail" {
                    return Err(RpcError::errno(libc::EINVAL));
                }
                Ok(json!(true))
            })
        });
    }
}

#[test]
fn config_loader_two_passes() {
    let _g = serial();
    register_loader_methods();
    take_log();
    let cfg = r#"
    // A saved config, with comments.
    {
      "subsystems": [
        { "subsystem": "not_linked", "config": [ {"method": "unknown_method"} ] },
        { "subsystem": "ldr", "config": [
            {"method": "ldr_runtime", "params": {"tag": "r1"}},
            {"method": "ldr_startup", "params": {"tag": "s1"}},
            /* a batch */
            [ {"method": "ldr_both", "params": {"tag": "b1"}},
              {"method": "ldr_runtime", "params": {"tag": "r2"}} ]
        ]},
        { "subsystem": "empty", "config": null }
      ]
    }"#;
    set_state(STARTUP);
    block_on(load_json_config(cfg, false, async {
        log("init");
        Ok(())
    }))
    .unwrap();
    assert_eq!(state(), RUNTIME);
    assert_eq!(
        take_log(),
        vec![
            "ldr_startup:s1",
            "ldr_both:b1",
            "init",
            "ldr_runtime:r1",
            "ldr_runtime:r2"
        ]
    );

    // Unknown method of a registered subsystem fails the load.
    set_state(STARTUP);
    let bad = r#"{"subsystems":[{"subsystem":"ldr","config":[{"method":"ldr_nope"}]}]}"#;
    assert_eq!(
        block_on(load_json_config(bad, true, async { Ok(()) })),
        Err(ConfigError::MethodNotFound("ldr_nope".into()))
    );
    assert_eq!(
        ConfigError::MethodNotFound("ldr_nope".into()).to_string(),
        "Method 'ldr_nope' was not found"
    );

    // An error response fails the load unless errors are ignored.
    let failing = r#"{"subsystems":[{"subsystem":"ldr","config":[
        {"method":"ldr_runtime","params":{"tag":"fail"}},
        {"method":"ldr_runtime","params":{"tag":"after"}}]}]}"#;
    set_state(STARTUP);
    assert_eq!(
        block_on(load_json_config(failing, false, async { Ok(()) })),
        Err(ConfigError::Rpc {
            method: "ldr_runtime".into(),
            error: RpcError::errno(libc::EINVAL)
        })
    );
    take_log();
    set_state(STARTUP);
    block_on(load_json_config(failing, true, async { Ok(()) })).unwrap();
    assert_eq!(take_log(), vec!["ldr_runtime:fail", "ldr_runtime:after"]);

    // Init failure stops before the RUNTIME pass.
    set_state(STARTUP);
    assert_eq!(
        block_on(load_json_config(failing, false, async {
            Err("boom".to_string())
        })),
        Err(ConfigError::Init("boom".into()))
    );
    assert!(take_log().is_empty());
    set_state(RUNTIME);
}

// ---------------------------------------------------------------------------
// The socket server on a real reactor runtime.

fn temp_sock() -> std::path::PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "rpc-test-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Read until `n` complete JSON values arrived.
fn read_values(s: &mut UnixStream, buf: &mut Vec<u8>, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let framed = take_values(buf, false);
        assert!(!framed.parse_error);
        out.extend(framed.values);
        if out.len() >= n {
            return out;
        }
        let k = s.read(&mut chunk).expect("read reply");
        assert!(k > 0, "connection closed early; got {out:?}");
        buf.extend_from_slice(&chunk[..k]);
    }
}

fn connect(path: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn server_over_unix_socket() {
    let _g = serial();
    register_test_methods();
    register("test_slow", STARTUP | RUNTIME, |params| {
        Box::pin(async move {
            let ms = params
                .as_ref()
                .and_then(|p| p.get("ms"))
                .and_then(|v| v.as_u64())
                .unwrap_or(100);
            if reactor::current() != Some(0) {
                return Err(RpcError::internal("handler not on reactor 0"));
            }
            reactor::sleep(Duration::from_millis(ms)).await;
            Ok(json!(ms))
        })
    });
    set_state(RUNTIME);

    let rt = reactor::start(
        reactor::Config {
            core_mask: 1,
            interrupt_mode: true,
            mem_size_mb: 8,
            no_huge: true,
            uring_entries: 64,
        },
        || {},
    )
    .expect("start reactor runtime");

    let path = temp_sock();
    let server = Server::listen(&path).expect("listen");
    let lock_path = {
        let mut s = path.clone().into_os_string();
        s.push(".lock");
        std::path::PathBuf::from(s)
    };
    assert!(path.exists() && lock_path.exists());

    // The lock keeps a second server off the path.
    match Server::listen(&path) {
        Err(e) => assert_eq!(
            e.to_string(),
            format!(
                "RPC Unix domain socket path {} in use. Specify another.",
                path.display()
            )
        ),
        Ok(_) => panic!("second listen on the same path succeeded"),
    }

    // 1. A pretty-printed request split across two writes.
    let mut s = connect(&path);
    let mut buf = Vec::new();
    let req = "{\n  \"jsonrpc\": \"2.0\",\n  \"method\": \"spdk_get_version\",\n  \"id\": 1\n}";
    s.write_all(&req.as_bytes()[..20]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    s.write_all(&req.as_bytes()[20..]).unwrap();
    let v = read_values(&mut s, &mut buf, 1);
    assert_eq!(v[0]["id"], json!(1));
    assert_eq!(v[0]["result"]["version"], json!("SPDK v26.09-pre"));
    assert!(v[0].get("error").is_none());

    // 2. Two requests in one write; replies in completion order (the slow
    // one was sent first but finishes last).
    s.write_all(
        br#"{"jsonrpc":"2.0","method":"test_slow","id":2,"params":{"ms":200}}{"jsonrpc":"2.0","method":"spdk_get_version","id":3}"#,
    )
    .unwrap();
    let v = read_values(&mut s, &mut buf, 2);
    assert_eq!(v[0]["id"], json!(3));
    assert_eq!(v[1], json!({"jsonrpc":"2.0","id":2,"result":200}));

    // 3. A notification gets no reply; the next request does.
    s.write_all(br#"{"jsonrpc":"2.0","method":"spdk_get_version"} {"jsonrpc":"2.0","method":"nope","id":4}"#)
        .unwrap();
    let v = read_values(&mut s, &mut buf, 1);
    assert_eq!(
        v[0],
        json!({"jsonrpc":"2.0","id":4,"error":{"code":-32601,"message":"Method not found"}})
    );

    // 4. A batch is answered with one array.
    s.write_all(br#"[{"jsonrpc":"2.0","method":"spdk_get_version","id":5},{"jsonrpc":"2.0","method":"test_fail","id":6}]"#)
        .unwrap();
    let v = read_values(&mut s, &mut buf, 1);
    let arr = v[0].as_array().expect("batch reply is an array");
    assert_eq!(arr.len(), 2);
    assert_eq!(arr[0]["id"], json!(5));
    assert_eq!(arr[1]["error"]["code"], json!(-19));
    assert!(buf.iter().all(|b| b.is_ascii_whitespace()));

    // 5. Malformed JSON: -32700, then the server closes this connection.
    let mut bad = connect(&path);
    bad.write_all(b"{\"method\": ]").unwrap();
    let mut rest = Vec::new();
    bad.read_to_end(&mut rest)
        .expect("server closes after a parse error");
    let v: Value = serde_json::from_slice(&rest).unwrap();
    assert_eq!(
        v,
        json!({"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}})
    );
    assert_eq!(rest.last(), Some(&b'\n'));

    // ... and keeps serving the others.
    s.write_all(br#"{"jsonrpc":"2.0","method":"spdk_get_version","id":7}"#)
        .unwrap();
    assert_eq!(read_values(&mut s, &mut buf, 1)[0]["id"], json!(7));

    // 6. Half-close: write, shutdown(Write), read_to_end gets the reply.
    let mut half = connect(&path);
    half.write_all(br#"{"jsonrpc":"2.0","method":"test_slow","id":8,"params":{"ms":100}}"#)
        .unwrap();
    half.shutdown(std::net::Shutdown::Write).unwrap();
    let mut all = Vec::new();
    half.read_to_end(&mut all).unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&all).unwrap(),
        json!({"jsonrpc":"2.0","id":8,"result":100})
    );

    // 7. A request bigger than the receive buffer: -32700 and close.
    let mut big = connect(&path);
    let mut huge = br#"{"jsonrpc":"2.0","method":"test_raw","id":9,"params":{"x":""#.to_vec();
    huge.resize(RECV_BUF_SIZE + 10, b'a');
    // The server may close before the whole payload is written.
    let _ = big.write_all(&huge);
    let mut rest = Vec::new();
    let _ = big.read_to_end(&mut rest);
    let v: Value = serde_json::from_slice(&rest).unwrap();
    assert_eq!(v["error"]["code"], json!(-32700));

    // Shutdown removes the socket and the lock file.
    server.shutdown();
    assert!(!path.exists() && !lock_path.exists());
    let mut closed = Vec::new();
    assert_eq!(s.read_to_end(&mut closed).unwrap_or(0), 0);

    reactor::stop();
    rt.join();
}
