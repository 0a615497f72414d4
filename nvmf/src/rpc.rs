//! The nvmf_* RPCs (SPDK `lib/nvmf/nvmf_rpc.c`) and the "nvmf" subsystem
//! config for `save_config`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::rpc::{register_typed, DecodeError, RpcError, RUNTIME};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::spec::DISCOVERY_NQN;
use crate::target::{
    self, lock, parse_hex, Adrfam, ListenAddr, Namespace, SubType, Subsystem, TransportOpts,
};

fn invalid() -> RpcError {
    RpcError::invalid_params("Invalid parameters")
}

/// SPDK logs "Unable to find subsystem with NQN ..." and answers with the
/// generic text.
fn no_subsystem(nqn: &str) -> RpcError {
    tracing::error!(nqn, "Unable to find subsystem with NQN {nqn}");
    invalid()
}

/// Decoded relaxed, as SPDK: keys of other transports are ignored.
#[derive(Deserialize)]
struct CreateTransport {
    trtype: String,
    #[allow(dead_code)]
    tgt_name: Option<String>,
    max_queue_depth: Option<u16>,
    max_io_qpairs_per_ctrlr: Option<u16>,
    in_capsule_data_size: Option<u32>,
    max_io_size: Option<u32>,
    io_unit_size: Option<u32>,
    max_aq_depth: Option<u32>,
    c2h_success: Option<bool>,
    sock_priority: Option<u32>,
    abort_timeout_sec: Option<u32>,
    zcopy: Option<bool>,
    dif_insert_or_strip: Option<bool>,
    ack_timeout: Option<u32>,
    data_wr_pool_size: Option<u32>,
    disable_command_passthru: Option<bool>,
    kas: Option<u16>,
    min_kato: Option<u32>,
    // Accepted and ignored (SPDK's generic transport knobs).
    #[allow(dead_code)]
    num_shared_buffers: Option<u32>,
    #[allow(dead_code)]
    buf_cache_size: Option<u32>,
    #[allow(dead_code)]
    iobuf_small_cache_size: Option<u32>,
    #[allow(dead_code)]
    iobuf_large_cache_size: Option<u32>,
    #[allow(dead_code)]
    control_msg_num: Option<u16>,
    #[allow(dead_code)]
    acceptor_poll_rate: Option<u32>,
}

fn create_transport(p: CreateTransport) -> Result<bool, RpcError> {
    if !p.trtype.eq_ignore_ascii_case("tcp") {
        return Err(RpcError::invalid_params(format!(
            "Invalid transport type '{}'",
            p.trtype
        )));
    }
    let o = given_or!(TransportOpts {
        max_queue_depth,
        max_io_qpairs_per_ctrlr,
        in_capsule_data_size,
        max_io_size,
        io_unit_size,
        max_aq_depth,
        c2h_success,
        sock_priority,
        abort_timeout_sec,
        zcopy,
        dif_insert_or_strip,
        ack_timeout,
        data_wr_pool_size,
        disable_command_passthru,
        kas,
        min_kato,
    } from p, else TransportOpts::default());
    let fail = || RpcError::internal("Transport type 'TCP' create failed");
    let bad = |what: &str| {
        tracing::error!("nvmf_create_transport: {what}");
        fail()
    };
    if o.max_queue_depth < 2 {
        return Err(bad("max_queue_depth must be at least 2"));
    }
    if o.max_aq_depth < 2 || o.max_aq_depth > 4096 {
        return Err(bad("max_aq_depth must be 2..4096"));
    }
    if o.max_io_qpairs_per_ctrlr == 0 {
        return Err(bad("max_io_qpairs_per_ctrlr must be at least 1"));
    }
    if o.in_capsule_data_size > target::MAX_H2C_DATA || !o.in_capsule_data_size.is_multiple_of(16) {
        return Err(bad(
            "in_capsule_data_size must be a multiple of 16 and at most 131072",
        ));
    }
    if o.max_io_size < 4096 || o.max_io_size > 8 << 20 {
        return Err(bad("max_io_size must be 4096..8 MiB"));
    }
    if o.io_unit_size < 512 || o.kas == 0 || o.sock_priority > 16 {
        return Err(bad("io_unit_size, kas or sock_priority out of range"));
    }
    // A write's buffer is allocated when its command arrives, before the
    // host sends the data: one queue pair can make the target hold a full
    // queue of the largest transfers. Refuse a transport whose one queue
    // pair could exhaust memory (SPDK's code and text, then why).
    let per_qpair = o.max_queue_depth as u64 * o.max_xfer() as u64;
    if let Err(e) = reactor::memory::check_available(per_qpair as usize) {
        tracing::error!(%e, "nvmf_create_transport: queue pair buffers exceed memory");
        return Err(RpcError::internal(format!(
            "Transport type 'TCP' create failed: one queue pair of max_queue_depth {} \
             may hold that many writes of max_io_size {} bytes: {e}",
            o.max_queue_depth, o.max_io_size
        )));
    }
    let mut t = target::tgt();
    if t.transport.is_some() {
        return Err(RpcError::internal("Transport type 'TCP' already exists"));
    }
    t.transport = Some(o);
    tracing::info!("NVMe/TCP transport created");
    Ok(true)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetTransports {
    trtype: Option<String>,
    #[allow(dead_code)]
    tgt_name: Option<String>,
}

fn get_transports(p: GetTransports) -> Result<Value, RpcError> {
    let t = target::transport();
    match (p.trtype, t) {
        (Some(tt), Some(o)) if tt.eq_ignore_ascii_case("tcp") => Ok(json!([o.to_json()])),
        (Some(_), _) => Err(RpcError::errno(libc::ENODEV)),
        (None, Some(o)) => Ok(json!([o.to_json()])),
        (None, None) => Ok(json!([])),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSubsystem {
    nqn: String,
    #[allow(dead_code)]
    tgt_name: Option<String>,
    serial_number: Option<String>,
    model_number: Option<String>,
    #[allow(dead_code)]
    admin_label: Option<String>,
    max_namespaces: Option<u32>,
    allow_any_host: Option<bool>,
    ana_reporting: Option<bool>,
    min_cntlid: Option<u16>,
    max_cntlid: Option<u16>,
    #[allow(dead_code)]
    dmrsl: Option<u32>,
    #[allow(dead_code)]
    wzsl: Option<u8>,
    passthrough: Option<bool>,
    enable_nssr: Option<bool>,
}

/// NQN rules (NVMe base spec §4.5): at most 223 bytes, "nqn.yyyy-mm.
/// reverse-domain[:...]" or the UUID form.
pub fn valid_nqn(nqn: &str) -> bool {
    if nqn.is_empty() || nqn.len() > 223 || !nqn.is_ascii() {
        return false;
    }
    if let Some(u) = nqn.strip_prefix("nqn.2014-08.org.nvmexpress:uuid:") {
        return Uuid::parse_str(u).is_ok();
    }
    let Some(rest) = nqn.strip_prefix("nqn.") else {
        return false;
    };
    let b = rest.as_bytes();
    if b.len() < 9
        || !b[..4].iter().all(u8::is_ascii_digit)
        || b[4] != b'-'
        || !b[5..7].iter().all(u8::is_ascii_digit)
        || b[7] != b'.'
    {
        return false;
    }
    let domain = rest[8..].split(':').next().unwrap_or("");
    !domain.is_empty() && !domain.starts_with('.') && !domain.ends_with('.')
}

fn printable(s: &str, max: usize) -> bool {
    s.len() <= max && s.bytes().all(|c| (0x20..0x7f).contains(&c))
}

fn create_subsystem(p: CreateSubsystem) -> Result<bool, RpcError> {
    let sn = p
        .serial_number
        .unwrap_or_else(|| "00000000000000000000".into());
    let mn = p
        .model_number
        .unwrap_or_else(|| "SPDK bdev Controller".into());
    if !printable(&sn, 20) || sn.is_empty() || !printable(&mn, 40) || mn.is_empty() {
        tracing::error!(sn, mn, "invalid serial or model number");
        return Err(invalid());
    }
    if p.passthrough == Some(true) || p.enable_nssr == Some(true) {
        tracing::error!("passthrough and NSSR are not supported");
        return Err(invalid());
    }
    let min = p.min_cntlid.unwrap_or(1);
    let max = p.max_cntlid.unwrap_or(0xFFEF);
    if min == 0 || max > 0xFFEF || min > max {
        return Err(RpcError::invalid_params(format!(
            "Invalid cntlid range [{min}-{max}]"
        )));
    }
    let unable = || RpcError::internal(format!("Unable to create subsystem {}", p.nqn));
    if !valid_nqn(&p.nqn) || p.nqn == DISCOVERY_NQN {
        tracing::error!(nqn = %p.nqn, "invalid subsystem NQN");
        return Err(unable());
    }
    let max_ns = match p.max_namespaces {
        None | Some(0) => 32,
        Some(n) => n.min(1024),
    };
    {
        let mut t = target::tgt();
        if t.subsystems.iter().any(|s| s.nqn == p.nqn) {
            tracing::error!(nqn = %p.nqn, "subsystem already exists");
            return Err(unable());
        }
        t.subsystems.push(Arc::new(Subsystem {
            serial_number: sn,
            model_number: mn,
            max_namespaces_set: p.max_namespaces.is_some_and(|n| n != 0),
            ana_reporting: p.ana_reporting.unwrap_or(false),
            ..Subsystem::new(
                p.nqn.clone(),
                SubType::Nvme,
                max_ns,
                (min, max),
                p.allow_any_host.unwrap_or(false),
            )
        }));
    }
    tracing::info!(nqn = %p.nqn, "subsystem created");
    target::discovery_changed();
    Ok(true)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NqnOnly {
    nqn: String,
    #[allow(dead_code)]
    tgt_name: Option<String>,
}

fn nvme_subsystem(nqn: &str) -> Option<Arc<Subsystem>> {
    target::find_subsystem(nqn).filter(|s| s.subtype == SubType::Nvme)
}

/// The subsystem `nqn` names (the discovery one too), or the logged error.
fn existing_subsystem(nqn: &str) -> Result<Arc<Subsystem>, RpcError> {
    target::find_subsystem(nqn).ok_or_else(|| no_subsystem(nqn))
}

/// The NVM subsystem `nqn` names, or the logged error.
fn existing_nvme_subsystem(nqn: &str) -> Result<Arc<Subsystem>, RpcError> {
    nvme_subsystem(nqn).ok_or_else(|| no_subsystem(nqn))
}

fn release_listener(a: &ListenAddr) {
    let mut t = target::tgt();
    let gone = match t.listeners.get_mut(a) {
        Some((_, n)) if *n > 1 => {
            *n -= 1;
            false
        }
        Some(_) => true,
        None => false,
    };
    if gone {
        if let Some((h, _)) = t.listeners.remove(a) {
            h.stop();
        }
    }
}

fn delete_subsystem(p: NqnOnly) -> Result<bool, RpcError> {
    let Some(s) = nvme_subsystem(&p.nqn) else {
        tracing::error!(nqn = %p.nqn, "subsystem not found");
        return Err(invalid());
    };
    target::tgt().subsystems.retain(|x| !Arc::ptr_eq(x, &s));
    let (listeners, ctrls, nss) = {
        let mut st = lock(&s.state);
        (
            std::mem::take(&mut st.listeners),
            st.ctrls.clone(),
            std::mem::take(&mut st.ns),
        )
    };
    for c in &ctrls {
        target::destroy_ctrl(c);
    }
    for ns in nss.into_iter().flatten() {
        ns.removed.store(true, Ordering::Release);
        lock(&ns.desc).take();
    }
    s.ns_gen.fetch_add(1, Ordering::AcqRel);
    for l in &listeners {
        release_listener(l);
    }
    tracing::info!(nqn = %p.nqn, "subsystem deleted");
    target::discovery_changed();
    Ok(true)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NsParams {
    bdev_name: String,
    nsid: Option<u32>,
    nguid: Option<String>,
    eui64: Option<String>,
    uuid: Option<String>,
    #[allow(dead_code)]
    ptpl_file: Option<String>,
    anagrpid: Option<u32>,
    no_auto_visible: Option<bool>,
    #[allow(dead_code)]
    hide_metadata: Option<bool>,
}

/// Top level decoded relaxed (as SPDK); `namespace` strictly.
#[derive(Deserialize)]
struct AddNs {
    nqn: String,
    namespace: NsParams,
    #[allow(dead_code)]
    tgt_name: Option<String>,
}

fn add_ns(p: AddNs) -> Result<u32, RpcError> {
    let s = existing_nvme_subsystem(&p.nqn)?;
    let n = p.namespace;
    let fail = |why: &str| {
        tracing::error!(nqn = %p.nqn, bdev = %n.bdev_name, "cannot add namespace: {why}");
        invalid()
    };
    if n.no_auto_visible == Some(true) || n.anagrpid.is_some_and(|a| a > 1) || n.ptpl_file.is_some()
    {
        return Err(fail(
            "no_auto_visible, ANA groups and ptpl_file are not supported",
        ));
    }
    let nguid = match &n.nguid {
        Some(g) => Some(parse_hex::<16>(g).ok_or_else(|| fail("nguid must be 32 hex digits"))?),
        None => None,
    };
    let eui64 = match &n.eui64 {
        Some(e) => Some(parse_hex::<8>(e).ok_or_else(|| fail("eui64 must be 16 hex digits"))?),
        None => None,
    };
    let uuid = match &n.uuid {
        Some(u) => Some(Uuid::parse_str(u).map_err(|_| fail("bad uuid"))?),
        None => None,
    };
    let nqn = s.nqn.clone();
    let sw = Arc::downgrade(&s);
    let nsid_cell = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let nsid_ev = nsid_cell.clone();
    let desc = bdev::open(&n.bdev_name, true, move |ev| {
        if ev == bdev::BdevEvent::Remove {
            let (sw, nqn) = (sw.clone(), nqn.clone());
            let nsid = nsid_ev.load(Ordering::Acquire);
            reactor::send(0, move || {
                if let Some(s) = sw.upgrade() {
                    tracing::warn!(nqn = %nqn, nsid, "bdev of namespace removed; removing the namespace");
                    let _ = remove_ns_inner(&s, nsid);
                }
            });
        }
    })
    .map_err(|e| fail(&e.to_string()))?;
    let bdev = desc.bdev().clone();
    let uuid = uuid.unwrap_or_else(|| bdev.uuid());
    let nsid = {
        let mut st = lock(&s.state);
        let nsid = match n.nsid {
            None | Some(0) => match st.ns.iter().position(Option::is_none) {
                Some(i) => i as u32 + 1,
                None => return Err(fail("no free namespace ID")),
            },
            Some(id) => id,
        };
        if nsid > s.max_namespaces || st.ns[nsid as usize - 1].is_some() {
            return Err(fail("namespace ID in use or above max_namespaces"));
        }
        if st
            .ns
            .iter()
            .flatten()
            .any(|x| x.uuid == uuid || (nguid.is_some() && Some(x.nguid) == nguid))
        {
            return Err(fail("duplicate UUID or NGUID in the subsystem"));
        }
        let ns = Namespace {
            nsid,
            bdev_name: n.bdev_name.clone(),
            block_size: bdev.block_size(),
            bdev,
            desc: Mutex::new(Some(desc)),
            removed: false.into(),
            uuid,
            nguid: nguid.unwrap_or(*uuid.as_bytes()),
            nguid_set: nguid.is_some(),
            eui64,
            uuid_set: n.uuid.is_some(),
            read_only: false,
        };
        st.ns[nsid as usize - 1] = Some(Arc::new(ns));
        nsid
    };
    nsid_cell.store(nsid, Ordering::Release);
    tracing::info!(nqn = %p.nqn, nsid, bdev = %n.bdev_name, "namespace added");
    target::namespace_changed(&s, nsid);
    Ok(nsid)
}

fn remove_ns_inner(s: &Arc<Subsystem>, nsid: u32) -> Result<(), ()> {
    let ns = {
        let mut st = lock(&s.state);
        if nsid == 0 || nsid as usize > st.ns.len() {
            return Err(());
        }
        st.ns[nsid as usize - 1].take().ok_or(())?
    };
    ns.removed.store(true, Ordering::Release);
    lock(&ns.desc).take();
    target::namespace_changed(s, nsid);
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveNs {
    nqn: String,
    nsid: u32,
    #[allow(dead_code)]
    tgt_name: Option<String>,
}

fn remove_ns(p: RemoveNs) -> Result<bool, RpcError> {
    let s = existing_nvme_subsystem(&p.nqn)?;
    remove_ns_inner(&s, p.nsid).map_err(|_| {
        tracing::error!(nqn = %p.nqn, nsid = p.nsid, "no such namespace");
        invalid()
    })?;
    tracing::info!(nqn = %p.nqn, nsid = p.nsid, "namespace removed");
    Ok(true)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenAddress {
    trtype: String,
    adrfam: Option<String>,
    traddr: String,
    trsvcid: Option<String>,
}

/// `nvmf_subsystem_add_listener`: top level decoded relaxed (as SPDK),
/// `listen_address` strictly.
#[derive(Deserialize)]
struct Listener {
    nqn: String,
    listen_address: ListenAddress,
    #[allow(dead_code)]
    tgt_name: Option<String>,
    secure_channel: Option<bool>,
    #[allow(dead_code)]
    ana_state: Option<String>,
    #[allow(dead_code)]
    sock_impl: Option<String>,
    #[allow(dead_code)]
    numa_id: Option<i32>,
}

fn listen_addr(a: &ListenAddress) -> Result<ListenAddr, RpcError> {
    if !a.trtype.eq_ignore_ascii_case("tcp") {
        tracing::error!(trtype = %a.trtype, "only the TCP transport exists");
        return Err(invalid());
    }
    let adrfam = match a.adrfam.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("ipv4") => Adrfam::Ipv4,
        Some("ipv6") => Adrfam::Ipv6,
        Some(o) => {
            tracing::error!(adrfam = o, "unsupported address family");
            return Err(invalid());
        }
    };
    let Some(svc) = a.trsvcid.clone() else {
        tracing::error!("trsvcid is required for TCP");
        return Err(invalid());
    };
    if svc.parse::<u16>().is_err() {
        tracing::error!(trsvcid = %svc, "trsvcid must be a port number");
        return Err(invalid());
    }
    let ok_addr = match adrfam {
        Adrfam::Ipv4 => a.traddr.parse::<std::net::Ipv4Addr>().is_ok(),
        Adrfam::Ipv6 => a.traddr.parse::<std::net::Ipv6Addr>().is_ok(),
    };
    if !ok_addr {
        tracing::error!(traddr = %a.traddr, "traddr is not an address of the family");
        return Err(invalid());
    }
    Ok(ListenAddr {
        adrfam,
        traddr: a.traddr.clone(),
        trsvcid: svc,
    })
}

/// How long `nvmf_subsystem_add_listener` keeps retrying a bind refused with
/// EADDRINUSE. A killed clone_tgt's listening socket outlives the process by
/// 10-20 ms (the kernel tears down its io_uring, which holds the pending
/// Accept, asynchronously), so a restart right after a crash would otherwise
/// fail its `--json` config load. A port really held by someone else still
/// fails, a second later.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

async fn listen_retrying(a: &ListenAddr) -> std::io::Result<Box<dyn target::Listener>> {
    Ok(Box::new(
        crate::tcp::listen_retrying(a, LISTEN_RETRY).await?,
    ))
}

async fn add_listener(p: Listener) -> Result<bool, RpcError> {
    let s = existing_subsystem(&p.nqn)?;
    if p.secure_channel == Some(true) {
        tracing::error!("secure channel (TLS) is not supported");
        return Err(invalid());
    }
    let a = listen_addr(&p.listen_address)?;
    if target::transport().is_none() {
        tracing::error!("no TCP transport: call nvmf_create_transport first");
        return Err(invalid());
    }
    if s.listens_on(&a) {
        tracing::error!(addr = %a, "listener already exists");
        return Err(invalid());
    }
    let cannot_listen = |e: std::io::Error| {
        tracing::error!(addr = %a, error = %e, "cannot listen");
        invalid()
    };
    // Bind before taking the target lock: the bind may wait (see LISTEN_RETRY).
    let served = target::tgt().listeners.contains_key(&a);
    let mut fresh = if served {
        None
    } else {
        Some(listen_retrying(&a).await.map_err(cannot_listen)?)
    };
    if fresh.is_some() {
        // Other RPCs may have run while the bind waited.
        let same = target::find_subsystem(&p.nqn).is_some_and(|s2| Arc::ptr_eq(&s, &s2));
        if !same || s.listens_on(&a) {
            if let Some(h) = fresh.take() {
                h.stop();
            }
            tracing::error!(addr = %a, nqn = %p.nqn, "subsystem deleted or listener added meanwhile");
            return Err(invalid());
        }
    }
    {
        let mut t = target::tgt();
        if let Some((_, n)) = t.listeners.get_mut(&a) {
            *n += 1;
            if let Some(h) = fresh.take() {
                // another subsystem's call bound the address meanwhile
                h.stop();
            }
        } else {
            let h = match fresh.take() {
                Some(h) => h,
                // released meanwhile: bind now (no wait under the lock)
                None => Box::new(crate::tcp::listen(&a).map_err(cannot_listen)?),
            };
            t.listeners.insert(a.clone(), (h, 1));
        }
        if !t.port_ids.contains_key(&a) {
            let id = t.next_port_id;
            t.next_port_id += 1;
            t.port_ids.insert(a.clone(), id);
        }
    }
    lock(&s.state).listeners.push(a);
    target::discovery_changed();
    Ok(true)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveListener {
    nqn: String,
    listen_address: ListenAddress,
    #[allow(dead_code)]
    tgt_name: Option<String>,
}

fn remove_listener(p: RemoveListener) -> Result<bool, RpcError> {
    let s = existing_subsystem(&p.nqn)?;
    let a = listen_addr(&p.listen_address)?;
    let ctrls = {
        let mut st = lock(&s.state);
        let before = st.listeners.len();
        st.listeners
            .retain(|l| !(l.traddr == a.traddr && l.trsvcid == a.trsvcid));
        if st.listeners.len() == before {
            tracing::error!(addr = %a, "no such listener");
            return Err(invalid());
        }
        st.ctrls
            .iter()
            .filter(|c| c.listen.trsvcid == a.trsvcid && c.listen.traddr == a.traddr)
            .cloned()
            .collect::<Vec<_>>()
    };
    for c in ctrls {
        target::destroy_ctrl(&c);
    }
    release_listener(&a);
    target::discovery_changed();
    Ok(true)
}

/// Decoded relaxed, as SPDK.
#[derive(Deserialize)]
struct AddHost {
    nqn: String,
    host: String,
    #[allow(dead_code)]
    tgt_name: Option<String>,
    psk: Option<String>,
    dhchap_key: Option<String>,
    dhchap_ctrlr_key: Option<String>,
}

fn add_host(p: AddHost) -> Result<bool, RpcError> {
    let s = existing_nvme_subsystem(&p.nqn)?;
    if p.psk.is_some() || p.dhchap_key.is_some() || p.dhchap_ctrlr_key.is_some() {
        tracing::error!("TLS PSK and DH-HMAC-CHAP keys are not supported");
        return Err(invalid());
    }
    if !valid_nqn(&p.host) {
        tracing::error!(host = %p.host, "invalid host NQN");
        return Err(RpcError::internal("Internal error"));
    }
    {
        let mut st = lock(&s.state);
        if st.hosts.contains(&p.host) {
            tracing::error!(host = %p.host, "host already allowed");
            return Err(RpcError::internal("Internal error"));
        }
        st.hosts.push(p.host);
    }
    target::discovery_changed();
    Ok(true)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveHost {
    nqn: String,
    host: String,
    #[allow(dead_code)]
    tgt_name: Option<String>,
    #[allow(dead_code)]
    timeout_ms: Option<u64>,
}

fn remove_host(p: RemoveHost) -> Result<bool, RpcError> {
    let s = existing_nvme_subsystem(&p.nqn)?;
    let ctrls = {
        let mut st = lock(&s.state);
        let before = st.hosts.len();
        st.hosts.retain(|h| h != &p.host);
        if st.hosts.len() == before {
            tracing::error!(host = %p.host, "host not on the access list");
            return Err(RpcError::internal("Internal error"));
        }
        if st.allow_any_host {
            Vec::new()
        } else {
            st.ctrls
                .iter()
                .filter(|c| c.hostnqn == p.host)
                .cloned()
                .collect()
        }
    };
    // SPDK disconnects the host's controllers when it loses access.
    for c in ctrls {
        target::destroy_ctrl(&c);
    }
    target::discovery_changed();
    Ok(true)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowAny {
    nqn: String,
    allow_any_host: bool,
    #[allow(dead_code)]
    tgt_name: Option<String>,
}

fn allow_any_host(p: AllowAny) -> Result<bool, RpcError> {
    let s = existing_nvme_subsystem(&p.nqn)?;
    lock(&s.state).allow_any_host = p.allow_any_host;
    target::discovery_changed();
    Ok(true)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetSubsystems {
    nqn: Option<String>,
    #[allow(dead_code)]
    tgt_name: Option<String>,
}

fn subsystem_json(s: &Subsystem) -> Value {
    let st = lock(&s.state);
    let mut m = serde_json::Map::new();
    m.insert("nqn".into(), json!(s.nqn));
    m.insert(
        "subtype".into(),
        json!(if s.subtype == SubType::Nvme {
            "NVMe"
        } else {
            "Discovery"
        }),
    );
    m.insert(
        "listen_addresses".into(),
        Value::Array(st.listeners.iter().map(ListenAddr::to_json).collect()),
    );
    m.insert("allow_any_host".into(), json!(st.allow_any_host));
    m.insert(
        "hosts".into(),
        Value::Array(st.hosts.iter().map(|h| json!({"nqn": h})).collect()),
    );
    if s.subtype == SubType::Nvme {
        m.insert("serial_number".into(), json!(s.serial_number));
        m.insert("model_number".into(), json!(s.model_number));
        m.insert("max_namespaces".into(), json!(s.max_namespaces));
        m.insert("passthrough".into(), json!(false));
        m.insert("min_cntlid".into(), json!(s.min_cntlid));
        m.insert("max_cntlid".into(), json!(s.max_cntlid));
        m.insert("dmrsl".into(), json!(0));
        m.insert("wzsl".into(), json!(0));
        m.insert(
            "namespaces".into(),
            Value::Array(st.ns.iter().flatten().map(|n| n.to_json(true)).collect()),
        );
    }
    Value::Object(m)
}

fn get_subsystems(p: GetSubsystems) -> Result<Value, RpcError> {
    let subs = target::tgt().subsystems.clone();
    match p.nqn {
        Some(nqn) => {
            let s = subs.iter().find(|s| s.nqn == nqn).ok_or_else(|| {
                RpcError::invalid_params(format!("Subsystem with NQN '{nqn}' not found"))
            })?;
            Ok(json!([subsystem_json(s)]))
        }
        None => Ok(Value::Array(
            subs.iter().map(|s| subsystem_json(s)).collect(),
        )),
    }
}

fn get_controllers(p: NqnOnly) -> Result<Value, RpcError> {
    let Some(s) = target::find_subsystem(&p.nqn) else {
        return Err(invalid());
    };
    let ctrls = lock(&s.state).ctrls.clone();
    Ok(Value::Array(ctrls.iter().map(|c| c.json()).collect()))
}

fn get_listeners(p: NqnOnly) -> Result<Value, RpcError> {
    let Some(s) = target::find_subsystem(&p.nqn) else {
        return Err(invalid());
    };
    let l = lock(&s.state).listeners.clone();
    Ok(Value::Array(
        l.iter().map(|a| json!({"address": a.to_json()})).collect(),
    ))
}

async fn get_qpairs(p: NqnOnly) -> Result<Value, RpcError> {
    if target::find_subsystem(&p.nqn).is_none() {
        return Err(invalid());
    }
    let out = Arc::new(Mutex::new(Vec::new()));
    let (o2, nqn) = (out.clone(), p.nqn.clone());
    bdev::util::on_each_reactor(move || {
        let v = crate::tcp::local_qpairs(&nqn);
        lock(&o2).extend(v);
    })
    .await;
    let v = std::mem::take(&mut *lock(&out));
    Ok(Value::Array(v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TgtOnly {
    #[allow(dead_code)]
    tgt_name: Option<String>,
}

fn get_stats(_p: TgtOnly) -> Result<Value, RpcError> {
    let groups: Vec<Value> = (0..reactor::num_reactors())
        .map(|r| {
            let s = target::stats(r);
            let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            json!({
                "name": format!("nvmf_tgt_poll_group_{r:03}"),
                "admin_qpairs": g(&s.admin_qpairs),
                "io_qpairs": g(&s.io_qpairs),
                "current_admin_qpairs": g(&s.current_admin_qpairs),
                "current_io_qpairs": g(&s.current_io_qpairs),
                "current_unassociated_qpairs": g(&s.current_unassociated_qpairs),
                "pending_bdev_io": g(&s.pending_bdev_io),
                "completed_nvme_io": g(&s.completed_nvme_io),
                "transports": if target::transport().is_some() { json!([{"trtype": "TCP"}]) } else { json!([]) },
            })
        })
        .collect();
    Ok(json!({"tick_rate": 1_000_000_000u64, "poll_groups": groups}))
}

/// The "nvmf" subsystem's `save_config` entries in SPDK's order:
/// transports, then per subsystem create, hosts, namespaces, listeners;
/// discovery listeners last.
pub fn config_json() -> Vec<Value> {
    let (transport, subs) = {
        let t = target::tgt();
        (t.transport.clone(), t.subsystems.clone())
    };
    let mut out = Vec::new();
    if let Some(o) = transport {
        out.push(json!({"method": "nvmf_create_transport", "params": o.to_json()}));
    }
    let mut disc = Vec::new();
    for s in subs.iter() {
        let st = lock(&s.state);
        if s.subtype == SubType::Discovery {
            for l in &st.listeners {
                disc.push(json!({"method": "nvmf_subsystem_add_listener", "params": {
                    "nqn": s.nqn, "listen_address": l.to_json(), "secure_channel": false}}));
            }
            continue;
        }
        let mut cp = serde_json::Map::new();
        cp.insert("nqn".into(), json!(s.nqn));
        cp.insert("allow_any_host".into(), json!(st.allow_any_host));
        cp.insert("serial_number".into(), json!(s.serial_number));
        cp.insert("model_number".into(), json!(s.model_number));
        if s.max_namespaces_set {
            cp.insert("max_namespaces".into(), json!(s.max_namespaces));
        }
        cp.insert("min_cntlid".into(), json!(s.min_cntlid));
        cp.insert("max_cntlid".into(), json!(s.max_cntlid));
        cp.insert("ana_reporting".into(), json!(s.ana_reporting));
        out.push(json!({"method": "nvmf_create_subsystem", "params": Value::Object(cp)}));
        for h in &st.hosts {
            out.push(
                json!({"method": "nvmf_subsystem_add_host", "params": {"nqn": s.nqn, "host": h}}),
            );
        }
        for n in st.ns.iter().flatten() {
            out.push(json!({"method": "nvmf_subsystem_add_ns", "params": {"nqn": s.nqn, "namespace": n.to_json(false)}}));
        }
        for l in &st.listeners {
            out.push(json!({"method": "nvmf_subsystem_add_listener", "params": {
                "nqn": s.nqn, "listen_address": l.to_json(), "secure_channel": false}}));
        }
    }
    out.extend(disc);
    out
}

/// Register the nvmf_* methods and the "nvmf" config subsystem.
pub fn register_methods() {
    register_typed(
        "nvmf_create_transport",
        RUNTIME,
        DecodeError::Internal,
        |p: CreateTransport| async move { create_transport(p) },
    );
    register_typed(
        "nvmf_get_transports",
        RUNTIME,
        DecodeError::InvalidParams,
        |p: GetTransports| async move { get_transports(p) },
    );
    register_typed(
        "nvmf_create_subsystem",
        RUNTIME,
        DecodeError::InvalidParams,
        |p: CreateSubsystem| async move { create_subsystem(p) },
    );
    register_typed(
        "nvmf_delete_subsystem",
        RUNTIME,
        DecodeError::InvalidParams,
        |p: NqnOnly| async move { delete_subsystem(p) },
    );
    register_typed(
        "nvmf_subsystem_add_ns",
        RUNTIME,
        DecodeError::InvalidParams,
        |p: AddNs| async move { add_ns(p) },
    );
    register_typed(
        "nvmf_subsystem_remove_ns",
        RUNTIME,
        DecodeError::InvalidParams,
        |p: RemoveNs| async move { remove_ns(p) },
    );
    register_typed(
        "nvmf_subsystem_add_listener",
        RUNTIME,
        DecodeError::InvalidParams,
        |p: Listener| async move { add_listener(p).await },
    );
    register_typed(
        "nvmf_subsystem_remove_listener",
        RUNTIME,
        DecodeError::InvalidParams,
        |p: RemoveListener| async move { remove_listener(p) },
    );
    register_typed(
        "nvmf_subsystem_add_host",
        RUNTIME,
        DecodeError::InvalidParams,
        |p: AddHost| async move { add_host(p) },
    );
    register_typed(
        "nvmf_subsystem_remove_host",
        RUNTIME,
        DecodeError::InvalidParams,
        |p: RemoveHost| async move { remove_host(p) },
    );
    register_typed(
        "nvmf_subsystem_allow_any_host",
        RUNTIME,
        DecodeError::InvalidParams,
        |p: AllowAny| async move { allow_any_host(p) },
    );
    register_typed(
        "nvmf_get_subsystems",
        RUNTIME,
        DecodeError::InvalidParams,
        |p: GetSubsystems| async move { get_subsystems(p) },
    );
    register_typed(
        "nvmf_subsystem_get_controllers",
        RUNTIME,
        DecodeError::InvalidParams,
        |p: NqnOnly| async move { get_controllers(p) },
    );
    register_typed(
        "nvmf_subsystem_get_listeners",
        RUNTIME,
        DecodeError::InvalidParams,
        |p: NqnOnly| async move { get_listeners(p) },
    );
    register_typed(
        "nvmf_subsystem_get_qpairs",
        RUNTIME,
        DecodeError::InvalidParams,
        |p: NqnOnly| get_qpairs(p),
    );
    register_typed(
        "nvmf_get_stats",
        RUNTIME,
        DecodeError::InvalidParams,
        |p: TgtOnly| async move { get_stats(p) },
    );
    ::rpc::register_subsystem("nvmf", &["bdev"], config_json);
}

/// Stop listeners and controllers (clean shutdown).
pub fn shutdown() {
    let (subs, listeners) = {
        let mut t = target::tgt();
        let l: Vec<_> = t.listeners.drain().map(|(_, (h, _))| h).collect();
        (t.subsystems.clone(), l)
    };
    for h in listeners {
        h.stop();
    }
    for s in subs {
        let ctrls = lock(&s.state).ctrls.clone();
        for c in ctrls {
            target::destroy_ctrl(&c);
        }
        let nss: Vec<_> = lock(&s.state)
            .ns
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for ns in nss {
            ns.removed.store(true, Ordering::Release);
            lock(&ns.desc).take();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nqn_rules() {
        assert!(valid_nqn("nqn.2016-06.io.spdk:cnode1"));
        assert!(valid_nqn(
            "nqn.2014-08.org.nvmexpress:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6"
        ));
        assert!(!valid_nqn("nqn.2014-08.org.nvmexpress:uuid:nope"));
        assert!(!valid_nqn("iqn.2016-06.io.spdk:x"));
        assert!(!valid_nqn("nqn.16-06.io.spdk:x"));
        assert!(!valid_nqn(&format!(
            "nqn.2016-06.io.spdk:{}",
            "a".repeat(300)
        )));
        assert!(!valid_nqn(""));
    }
}
