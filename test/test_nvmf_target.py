"""NVMe-oF/TCP target: the nvmf_* RPCs through SPDK's own client and CLI,
save_config replay, and the wire protocol through a raw-socket probe
(test/nvmf_probe.py), including malformed PDUs."""

import json
import os
import socket
import struct
import time

import pytest

import nvmf_probe as P

NQN = "nqn.2016-06.io.spdk:cnode1"
NQN2 = "nqn.2016-06.io.spdk:cnode2"
HOST2 = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
ADDR = "127.0.0.1"


def free_port():
    s = socket.socket()
    s.bind((ADDR, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def setup_target(tgt, port, blocks=32768, bs=512, any_host=True, bdev="Malloc0"):
    tgt.rpc("bdev_malloc_create", name=bdev, num_blocks=blocks, block_size=bs)
    tgt.rpc("nvmf_create_transport", trtype="TCP")
    tgt.rpc("nvmf_create_subsystem", nqn=NQN, allow_any_host=any_host, serial_number="SN0001",
            model_number="clone-tgt test")
    nsid = tgt.rpc("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": bdev})
    assert nsid == 1
    tgt.rpc("nvmf_subsystem_add_listener", nqn=NQN,
            listen_address={"trtype": "tcp", "traddr": ADDR, "trsvcid": str(port)})


# ---------------------------------------------------------------------------
# RPCs


def test_transport_rpcs(tgt):
    assert tgt.rpc("nvmf_get_transports") == []
    assert tgt.rpc_err("nvmf_create_transport", trtype="FOO") == (
        -32602, "Invalid transport type 'FOO'")
    # Relaxed decoding: RDMA-only keys are ignored for TCP.
    assert tgt.rpc("nvmf_create_transport", trtype="tcp", max_queue_depth=64,
                   in_capsule_data_size=8192, no_srq=False, num_cqe=1024) is True
    assert tgt.rpc_err("nvmf_create_transport", trtype="TCP") == (
        -32603, "Transport type 'TCP' already exists")
    t = tgt.rpc("nvmf_get_transports")
    assert len(t) == 1 and t[0]["trtype"] == "TCP"
    assert t[0]["max_queue_depth"] == 64 and t[0]["in_capsule_data_size"] == 8192
    assert t[0]["max_io_size"] == 131072 and t[0]["c2h_success"] is True
    assert tgt.rpc("nvmf_get_transports", trtype="tcp") == t
    assert tgt.rpc_err("nvmf_get_transports", trtype="RDMA") == (-19, "No such device")


def test_transport_bad_values(tgt):
    assert tgt.rpc_err("nvmf_create_transport", trtype="TCP", max_queue_depth=1) == (
        -32603, "Transport type 'TCP' create failed")
    assert tgt.rpc_err("nvmf_create_transport", trtype="TCP", in_capsule_data_size=1000)[0] == -32603
    code, _ = tgt.rpc_err("nvmf_create_transport", trtype="TCP", max_queue_depth="x")
    assert code == -32603
    assert tgt.rpc("nvmf_get_transports") == []


def test_subsystem_rpcs(tgt):
    subs = tgt.rpc("nvmf_get_subsystems")
    assert [s["nqn"] for s in subs] == [P.DISCOVERY_NQN]
    assert subs[0]["subtype"] == "Discovery"
    tgt.cli("nvmf_create_subsystem", NQN, "-a", "-s", "SPDK00000000000001", "-d", "Ctrl model",
            "-m", "8")
    s = tgt.rpc("nvmf_get_subsystems", nqn=NQN)[0]
    assert s["subtype"] == "NVMe" and s["allow_any_host"] is True
    assert s["serial_number"] == "SPDK00000000000001" and s["model_number"] == "Ctrl model"
    assert s["max_namespaces"] == 8 and s["namespaces"] == [] and s["hosts"] == []
    assert s["min_cntlid"] == 1 and s["max_cntlid"] == 65519
    assert tgt.rpc_err("nvmf_create_subsystem", nqn=NQN) == (
        -32603, "Unable to create subsystem %s" % NQN)
    assert tgt.rpc_err("nvmf_create_subsystem", nqn="not-an-nqn") == (
        -32603, "Unable to create subsystem not-an-nqn")
    assert tgt.rpc_err("nvmf_create_subsystem", nqn=NQN2, min_cntlid=10, max_cntlid=5) == (
        -32602, "Invalid cntlid range [10-5]")
    assert tgt.rpc_err("nvmf_create_subsystem", nqn=NQN2, serial_number="x" * 21) == (
        -32602, "Invalid parameters")
    assert tgt.rpc_err("nvmf_create_subsystem", nqn=NQN2, bogus=1) == (-32602, "Invalid parameters")
    assert tgt.rpc_err("nvmf_get_subsystems", nqn=NQN2) == (
        -32602, "Subsystem with NQN '%s' not found" % NQN2)
    assert tgt.rpc("nvmf_delete_subsystem", nqn=NQN) is True
    assert tgt.rpc_err("nvmf_delete_subsystem", nqn=NQN) == (-32602, "Invalid parameters")
    assert tgt.rpc_err("nvmf_delete_subsystem", nqn=P.DISCOVERY_NQN) == (-32602, "Invalid parameters")
    assert [s["nqn"] for s in tgt.rpc("nvmf_get_subsystems")] == [P.DISCOVERY_NQN]


def test_namespace_rpcs(tgt):
    tgt.rpc("bdev_malloc_create", name="M0", num_blocks=2048, block_size=512)
    tgt.rpc("bdev_malloc_create", name="M1", num_blocks=2048, block_size=4096)
    tgt.rpc("nvmf_create_subsystem", nqn=NQN, max_namespaces=4)
    assert tgt.rpc_err("nvmf_subsystem_add_ns", nqn=NQN2, namespace={"bdev_name": "M0"}) == (
        -32602, "Invalid parameters")
    # The namespace object is decoded strictly.
    assert tgt.rpc_err("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "M0", "x": 1}) == (
        -32602, "Invalid parameters")
    assert tgt.rpc_err("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "nope"}) == (
        -32602, "Invalid parameters")
    tgt.cli("nvmf_subsystem_add_ns", NQN, "M0", "-g", "00112233445566778899AABBCCDDEEFF",
            "-e", "0011223344556677")
    assert tgt.rpc("nvmf_subsystem_add_ns", nqn=NQN,
                   namespace={"bdev_name": "M1", "nsid": 3,
                              "uuid": "12345678-1234-5678-1234-567812345678"}) == 3
    assert tgt.rpc_err("nvmf_subsystem_add_ns", nqn=NQN,
                       namespace={"bdev_name": "M1", "nsid": 3}) == (-32602, "Invalid parameters")
    assert tgt.rpc_err("nvmf_subsystem_add_ns", nqn=NQN,
                       namespace={"bdev_name": "M1", "nsid": 5}) == (-32602, "Invalid parameters")
    assert tgt.rpc_err("nvmf_subsystem_add_ns", nqn=NQN,
                       namespace={"bdev_name": "M1", "nguid": "xyz"}) == (-32602, "Invalid parameters")
    ns = tgt.rpc("nvmf_get_subsystems", nqn=NQN)[0]["namespaces"]
    assert [n["nsid"] for n in ns] == [1, 3]
    assert ns[0]["bdev_name"] == "M0" and ns[0]["name"] == "M0"
    assert ns[0]["nguid"] == "00112233445566778899AABBCCDDEEFF" and ns[0]["eui64"] == "0011223344556677"
    assert ns[1]["uuid"] == "12345678-1234-5678-1234-567812345678"
    assert tgt.rpc("nvmf_subsystem_remove_ns", nqn=NQN, nsid=1) is True
    assert tgt.rpc_err("nvmf_subsystem_remove_ns", nqn=NQN, nsid=1) == (-32602, "Invalid parameters")
    assert [n["nsid"] for n in tgt.rpc("nvmf_get_subsystems", nqn=NQN)[0]["namespaces"]] == [3]
    # The bdev is closed again: it can be deleted.
    tgt.rpc("bdev_malloc_delete", name="M0")


def test_listener_and_host_rpcs(tgt):
    port = free_port()
    tgt.rpc("nvmf_create_subsystem", nqn=NQN)
    la = {"trtype": "TCP", "traddr": ADDR, "trsvcid": str(port)}
    # No transport yet.
    assert tgt.rpc_err("nvmf_subsystem_add_listener", nqn=NQN, listen_address=la) == (
        -32602, "Invalid parameters")
    tgt.rpc("nvmf_create_transport", trtype="TCP")
    tgt.cli("nvmf_subsystem_add_listener", NQN, "-t", "tcp", "-a", ADDR, "-s", str(port))
    assert tgt.rpc_err("nvmf_subsystem_add_listener", nqn=NQN, listen_address=la) == (
        -32602, "Invalid parameters")
    assert tgt.rpc_err("nvmf_subsystem_add_listener", nqn=NQN2, listen_address=la) == (
        -32602, "Invalid parameters")
    assert tgt.rpc_err("nvmf_subsystem_add_listener", nqn=NQN,
                       listen_address={"trtype": "TCP", "traddr": "not-ip", "trsvcid": "1"}) == (
        -32602, "Invalid parameters")
    # The discovery subsystem through the CLI's "discovery" name.
    tgt.cli("nvmf_subsystem_add_listener", "discovery", "-t", "tcp", "-a", ADDR, "-s", str(port))
    subs = {s["nqn"]: s for s in tgt.rpc("nvmf_get_subsystems")}
    want = [{"trtype": "TCP", "adrfam": "IPv4", "traddr": ADDR, "trsvcid": str(port)}]
    assert subs[NQN]["listen_addresses"] == want
    assert subs[P.DISCOVERY_NQN]["listen_addresses"] == want
    assert tgt.rpc("nvmf_subsystem_get_listeners", nqn=NQN) == [{"address": want[0]}]
    assert tgt.rpc_err("nvmf_subsystem_get_listeners", nqn=NQN2) == (-32602, "Invalid parameters")
    # Decoded relaxed, as SPDK: an unknown key is ignored.
    assert tgt.rpc("nvmf_subsystem_add_host", nqn=NQN, host=HOST2, some_future_key=1) is True
    assert tgt.rpc_err("nvmf_subsystem_add_host", nqn=NQN, host=HOST2) == (-32603, "Internal error")
    assert tgt.rpc_err("nvmf_subsystem_add_host", nqn=NQN2, host=HOST2) == (-32602, "Invalid parameters")
    tgt.cli("nvmf_subsystem_allow_any_host", NQN, "--allow-any-host")
    s = tgt.rpc("nvmf_get_subsystems", nqn=NQN)[0]
    assert s["hosts"] == [{"nqn": HOST2}] and s["allow_any_host"] is True
    tgt.cli("nvmf_subsystem_allow_any_host", NQN, "--no-allow-any-host")
    tgt.cli("nvmf_subsystem_remove_host", NQN, HOST2)
    assert tgt.rpc_err("nvmf_subsystem_remove_host", nqn=NQN, host=HOST2) == (
        -32603, "Internal error")
    tgt.cli("nvmf_subsystem_remove_listener", NQN, "-t", "tcp", "-a", ADDR, "-s", str(port))
    assert tgt.rpc_err("nvmf_subsystem_remove_listener", nqn=NQN, listen_address=la) == (
        -32602, "Invalid parameters")
    s = tgt.rpc("nvmf_get_subsystems", nqn=NQN)[0]
    assert s["listen_addresses"] == [] and s["hosts"] == [] and s["allow_any_host"] is False
    # A socket no subsystem uses any more is closed: the port can be bound again.
    tgt.cli("nvmf_subsystem_remove_listener", "discovery", "-t", "tcp", "-a", ADDR, "-s", str(port))
    with pytest.raises(OSError):
        socket.create_connection((ADDR, port), timeout=2).close()
    tgt.rpc("nvmf_subsystem_add_listener", nqn=NQN, listen_address=la)
    tgt.rpc("nvmf_subsystem_add_listener", nqn=P.DISCOVERY_NQN, listen_address=la)
    # The discovery listener still serves.
    d = P.admin_session(ADDR, port, P.DISCOVERY_NQN)
    d.close()


def test_save_config_replay(tgt_factory, workdir):
    port = free_port()
    t1 = tgt_factory(name="first")
    setup_target(t1, port)
    t1.rpc("bdev_malloc_create", name="Malloc1", num_blocks=4096, block_size=4096)
    t1.rpc("nvmf_create_subsystem", nqn=NQN2, serial_number="SN2", max_namespaces=7,
           min_cntlid=5, max_cntlid=50)
    t1.rpc("nvmf_subsystem_add_host", nqn=NQN2, host=HOST2)
    t1.rpc("nvmf_subsystem_add_ns", nqn=NQN2,
           namespace={"bdev_name": "Malloc1", "nsid": 7, "nguid": "0123456789ABCDEF0123456789ABCDEF"})
    t1.rpc("nvmf_subsystem_add_listener", nqn=NQN2,
           listen_address={"trtype": "TCP", "traddr": ADDR, "trsvcid": str(port)})
    t1.rpc("nvmf_subsystem_add_listener", nqn=P.DISCOVERY_NQN,
           listen_address={"trtype": "TCP", "traddr": ADDR, "trsvcid": str(port)})
    cfg_text = t1.cli("save_config").stdout
    cfg = json.loads(cfg_text)
    names = [s["subsystem"] for s in cfg["subsystems"]]
    assert "nvmf" in names and names.index("nvmf") > names.index("bdev")
    nvmf = next(s for s in cfg["subsystems"] if s["subsystem"] == "nvmf")["config"]
    methods = [m["method"] for m in nvmf]
    assert methods == [
        "nvmf_create_transport",
        "nvmf_create_subsystem", "nvmf_subsystem_add_ns", "nvmf_subsystem_add_listener",
        "nvmf_create_subsystem", "nvmf_subsystem_add_host", "nvmf_subsystem_add_ns",
        "nvmf_subsystem_add_listener",
        "nvmf_subsystem_add_listener",
    ], methods
    subs1 = t1.rpc("nvmf_get_subsystems")
    tr1 = t1.rpc("nvmf_get_transports")
    t1.stop()
    path = workdir / "nvmf.json"
    path.write_text(cfg_text)
    t2 = tgt_factory("--json", path, name="second")
    assert t2.rpc("nvmf_get_subsystems") == subs1
    assert t2.rpc("nvmf_get_transports") == tr1
    assert json.loads(t2.cli("save_config").stdout) == cfg
    # And it serves.
    a = P.admin_session(ADDR, port, NQN)
    assert struct.unpack("<I", a.identify(2)[:4])[0] == 1
    a.close()


# ---------------------------------------------------------------------------
# The wire protocol


@pytest.mark.parametrize("digests", [(False, False), (True, True)], ids=["plain", "digests"])
def test_connect_identify_io(tgt, digests):
    port = free_port()
    setup_target(tgt, port)
    hd, dd = digests
    a = P.admin_session(ADDR, port, NQN, kato=10000, hdgst=hd, ddgst=dd)
    cap = a.prop_get(0, size8=True)
    assert cap & 0xFFFF == 127 and (cap >> 37) & 1 == 1 and (cap >> 24) & 0xFF > 0
    assert a.prop_get(8) == 0x00010300
    idc = a.identify(1)
    assert idc[4:24] == b"SN0001".ljust(20) and idc[24:64] == b"clone-tgt test".ljust(40)
    assert struct.unpack("<H", idc[78:80])[0] == a.cntlid
    assert idc[512] == 0x66 and idc[513] == 0x44 and idc[111] == 1
    assert struct.unpack("<H", idc[320:322])[0] > 0  # KAS
    assert struct.unpack("<H", idc[514:516])[0] == 128  # MAXCMD
    assert struct.unpack("<I", idc[536:540])[0] == 0x00100001  # SGLS
    assert struct.unpack("<II", idc[1792:1800]) == (260, 1)
    assert idc[768:768 + len(NQN) + 1] == NQN.encode() + b"\0"
    cqe = a.set_features(0x07, (1 << 16) | 1)
    assert cqe["dw0"] == (1 << 16) | 1
    ns = a.identify(0, 1)
    assert struct.unpack("<QQ", ns[:16]) == (32768, 32768) and ns[128 + 2] == 9
    assert struct.unpack("<2I", a.identify(2)[:8]) == (1, 0)
    desc = a.identify(3, 1)
    assert desc[0] == 2 and desc[1] == 16 and desc[20] == 3 and desc[21] == 16 and desc[40] == 4
    # Inactive but valid NSID: zeroes; beyond NN: Invalid Namespace.
    assert a.identify(0, 2) == bytes(4096)
    cqe, _ = a.cmd(0x06, 1000, (0, 0, 0, 0, 0, 0), read_len=4096, check=False)
    assert (cqe["sct"], cqe["sc"], cqe["dnr"]) == (0, 0x0B, 1)
    io = P.io_session(ADDR, port, NQN, a.cntlid, hdgst=hd, ddgst=dd)
    small = os.urandom(4096)
    io.write(1, 0, small)  # in-capsule
    big = os.urandom(128 * 1024)
    io.write(1, 64, big, fua=True)  # R2T + H2CData
    assert io.read(1, 0, 8)[1] == small
    assert io.read(1, 64, 256)[1] == big
    io.cmd(0x00, 1)  # flush
    # Write Zeroes and Dataset Management (deallocate).
    io.cmd(0x08, 1, (64, 0, 7, 0, 0, 0))
    assert io.read(1, 64, 8)[1] == bytes(4096)
    rng = struct.pack("<IIQ", 0, 8, 72)
    io.cmd(0x09, 1, (0, 4, 0, 0, 0, 0), write=rng)
    # Errors.
    cqe, _ = io.read(1, 32767, 2, check=False)
    assert (cqe["sct"], cqe["sc"], cqe["dnr"]) == (0, 0x80, 1)
    cqe, _ = io.write(1, 32760, os.urandom(8192 * 2), check=False)
    assert (cqe["sct"], cqe["sc"]) == (0, 0x80)
    cqe, _ = io.cmd(0x05, 1, check=False)
    assert (cqe["sct"], cqe["sc"], cqe["dnr"]) == (0, 0x01, 1)
    cqe, _ = io.read(9, 0, 1, check=False)
    assert (cqe["sct"], cqe["sc"]) == (0, 0x0B)
    # Still in sync after the errors.
    assert io.read(1, 0, 8)[1] == small
    ctrls = tgt.rpc("nvmf_subsystem_get_controllers", nqn=NQN)
    assert len(ctrls) == 1 and ctrls[0]["cntlid"] == a.cntlid and ctrls[0]["num_io_qpairs"] == 1
    assert ctrls[0]["hostnqn"] == P.HOSTNQN and ctrls[0]["cntrltype"] == "io"
    qps = tgt.rpc("nvmf_subsystem_get_qpairs", nqn=NQN)
    assert sorted(q["qid"] for q in qps) == [0, 1]
    stats = tgt.rpc("nvmf_get_stats")
    assert sum(g["completed_nvme_io"] for g in stats["poll_groups"]) >= 10
    assert sum(g["current_io_qpairs"] for g in stats["poll_groups"]) == 1
    # A second I/O queue with SQ flow control disabled: Connect reports SQHD
    # FFFFh and successful reads end with a C2HData carrying SUCCESS (no CQE).
    q2 = P.Conn(ADDR, port, hdgst=hd, ddgst=dd)
    q2.icreq()
    cqe = q2.connect(NQN, qid=2, sqsize=31, cntlid=a.cntlid, cattr=4)
    assert cqe["sqhd"] == 0xFFFF
    cid = q2.next_cid()
    q2.capsule(P.sqe(0x02, cid, 1, (0, 4096, 0x5A), (0, 0, 7, 0, 0, 0)))
    p = q2.recv_pdu()
    assert p["type"] == P.C2H_DATA and p["flags"] & (P.SUCCESS | P.LAST_PDU) == P.SUCCESS | P.LAST_PDU
    assert p["data"] == small
    # (LBAs 64..79 were zeroed and deallocated above.)
    assert q2.read(1, 80, 240)[1] == big[16 * 512:]
    q2.close()
    # Shutdown: SHN → SHST complete, I/O queue closed.
    a.prop_set(0x14, 0x00464001)
    assert (a.prop_get(0x1C) >> 2) & 3 == 2
    assert io.expect_eof()
    io.close()
    a.close()


def test_log_pages_features_aen(tgt):
    port = free_port()
    setup_target(tgt, port)
    tgt.rpc("bdev_malloc_create", name="Extra", num_blocks=1024, block_size=512)
    a = P.admin_session(ADDR, port, NQN, kato=10000)
    _, smart = a.get_log(0x02, 512)
    assert smart[3] == 100
    cqe, _ = a.get_log(0x42, 512, check=False)
    assert (cqe["sct"], cqe["sc"]) == (1, 0x09)
    cqe, _ = a.get_log(0x02, 512, lpo=2, check=False)
    assert (cqe["sct"], cqe["sc"]) == (0, 0x02)
    assert a.cmd(0x0A, 0, (0x0F, 0, 0, 0, 0, 0))[0]["dw0"] == 10000
    cqe = a.set_features(0x0F, 0, check=False)
    assert (cqe["sct"], cqe["sc"]) == (0, 0x1A)
    assert a.cmd(0x0A, 0, (0x06, 0, 0, 0, 0, 0))[0]["dw0"] == 1
    cqe = a.set_features(0x42, 0, check=False)
    assert (cqe["sct"], cqe["sc"], cqe["dnr"]) == (0, 0x02, 1)
    a.cmd(0x18)  # keep alive
    a.set_features(0x0B, 1 << 8)
    # Post an AER, then add a namespace: the AER completes with NS changed.
    cid = a.next_cid()
    a.capsule(P.sqe(0x0C, cid))
    tgt.rpc("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "Extra"})
    p = a.recv_pdu()
    cqe = P.parse_cqe(p["raw"][8:24])
    assert cqe["cid"] == cid and cqe["dw0"] == 0x00040002
    _, log = a.get_log(0x04, 4096)
    assert struct.unpack("<2I", log[:8]) == (2, 0)
    # Deleting the bdev removes the namespace and raises the event again.
    cid = a.next_cid()
    a.capsule(P.sqe(0x0C, cid))
    tgt.rpc("bdev_malloc_delete", name="Extra")
    p = a.recv_pdu()
    cqe = P.parse_cqe(p["raw"][8:24])
    assert cqe["cid"] == cid and cqe["dw0"] == 0x00040002
    _, log = a.get_log(0x04, 4096)
    assert struct.unpack("<I", log[:4])[0] == 2
    assert [n["nsid"] for n in tgt.rpc("nvmf_get_subsystems", nqn=NQN)[0]["namespaces"]] == [1]
    assert struct.unpack("<2I", a.identify(2)[:8]) == (1, 0)
    a.close()


def test_host_access_list_and_discovery(tgt):
    port = free_port()
    setup_target(tgt, port, any_host=False)
    c = P.Conn(ADDR, port)
    c.icreq()
    cqe = c.connect(NQN, check=False)
    assert (cqe["sct"], cqe["sc"], cqe["dnr"]) == (1, 0x84, 1)
    c.close()
    # Unknown subsystem: Connect Invalid Parameters, IATTR 1, IPO 256.
    c = P.Conn(ADDR, port)
    c.icreq()
    cqe = c.connect(NQN2, check=False)
    assert (cqe["sct"], cqe["sc"], cqe["dw0"]) == (1, 0x82, (1 << 16) | 256)
    c.close()
    # The discovery subsystem is served on the I/O listener; the log hides
    # subsystems the host may not access.
    d = P.admin_session(ADDR, port, P.DISCOVERY_NQN)
    idc = d.identify(1)
    assert idc[111] == 2
    _, hdr = d.get_log(0x70, 20)
    assert struct.unpack("<QQH", hdr[:18])[1:] == (0, 0)
    tgt.rpc("nvmf_subsystem_add_host", nqn=NQN, host=P.HOSTNQN)
    _, hdr = d.get_log(0x70, 20)
    genctr, numrec, recfmt = struct.unpack("<QQH", hdr[:18])
    assert numrec == 1 and recfmt == 0
    _, ent = d.get_log(0x70, 1024, lpo=1024)
    assert ent[0] == 3 and ent[1] == 1 and ent[2] == 2
    assert ent[32:32 + len(str(port))] == str(port).encode()
    assert ent[256:256 + len(NQN)] == NQN.encode() and ent[512:521] == b"127.0.0.1"
    # Past the end: zero-filled.
    _, tail = d.get_log(0x70, 4096, lpo=0)
    assert tail[2048:] == bytes(2048)
    cqe, _ = d.get_log(0x02, 512, check=False)
    assert cqe["sc"] != 0
    cqe, _ = d.cmd(0x06, 0, (0, 0, 0, 0, 0, 0), read_len=4096, check=False)
    assert (cqe["sct"], cqe["sc"]) == (0, 0x02)
    d.cmd(0x18)
    d.close()
    a = P.admin_session(ADDR, port, NQN)
    # I/O Connect with a wrong CNTLID, a duplicate qid, a qid beyond the grant.
    a.set_features(0x07, 0)
    c = P.Conn(ADDR, port)
    c.icreq()
    cqe = c.connect(NQN, qid=1, cntlid=a.cntlid + 100, check=False)
    assert (cqe["sct"], cqe["sc"], cqe["dw0"]) == (1, 0x82, (1 << 16) | 16)
    c.close()
    io = P.io_session(ADDR, port, NQN, a.cntlid)
    c = P.Conn(ADDR, port)
    c.icreq()
    cqe = c.connect(NQN, qid=1, cntlid=a.cntlid, check=False)
    assert (cqe["sct"], cqe["sc"]) == (1, 0x01)
    c.close()
    c = P.Conn(ADDR, port)
    c.icreq()
    cqe = c.connect(NQN, qid=2, cntlid=a.cntlid, check=False)
    assert (cqe["sct"], cqe["sc"], cqe["dw0"]) == (1, 0x82, 42)
    c.close()
    io.close()
    a.close()


def test_keep_alive_timeout(tgt):
    port = free_port()
    setup_target(tgt, port)
    a = P.admin_session(ADDR, port, NQN, kato=1000)
    io = P.io_session(ADDR, port, NQN, a.cntlid)
    assert len(tgt.rpc("nvmf_subsystem_get_controllers", nqn=NQN)) == 1
    time.sleep(2.5)
    assert a.expect_eof() and io.expect_eof()
    assert tgt.rpc("nvmf_subsystem_get_controllers", nqn=NQN) == []
    # Keep-alives keep it alive.
    b = P.admin_session(ADDR, port, NQN, kato=1000)
    for _ in range(6):
        time.sleep(0.4)
        b.cmd(0x18)
    assert len(tgt.rpc("nvmf_subsystem_get_controllers", nqn=NQN)) == 1
    b.close()


def test_data_digest_error_fails_command(tgt):
    port = free_port()
    setup_target(tgt, port)
    a = P.admin_session(ADDR, port, NQN)
    io = P.io_session(ADDR, port, NQN, a.cntlid, hdgst=True, ddgst=True)
    data = os.urandom(4096)
    cid = io.next_cid()
    s = P.sqe(0x01, cid, 1, (0, 4096, 0x01), (0, 0, 7, 0, 0, 0))
    h = struct.pack("<BBBBI", P.CMD, P.HDGSTF | P.DDGSTF, 72, 76, 76 + 4096 + 4) + s
    h += struct.pack("<I", P.crc32c(h))
    io.send(h + data + struct.pack("<I", P.crc32c(data) ^ 1))
    p = io.recv_pdu()
    cqe = P.parse_cqe(p["raw"][8:24])
    assert (cqe["cid"], cqe["sct"], cqe["sc"]) == (cid, 0, 0x22)
    # The stream is still in sync and the data was not written.
    assert io.read(1, 0, 8)[1] != data
    # A large H2CData sent in pieces (the target receives its payload
    # straight into the command buffer), once with a good and once with a
    # bad data digest.
    for bad in (False, True):
        big = os.urandom(65536)
        cid = io.next_cid()
        io.capsule(P.sqe(0x01, cid, 1, (0, len(big), 0x5A), (256, 0, 127, 0, 0, 0)))
        p = io.recv_pdu()
        assert p["type"] == P.R2T
        cccid, ttag, r2to, r2tl = struct.unpack("<HHII", p["raw"][8:20])
        assert (cccid, r2to, r2tl) == (cid, 0, len(big))
        h = struct.pack("<BBBBIHHII4x", P.H2C_DATA, P.HDGSTF | P.DDGSTF | P.LAST_PDU, 24, 28,
                        28 + len(big) + 4, cid, ttag, 0, len(big))
        h += struct.pack("<I", P.crc32c(h))
        dg = P.crc32c(big) ^ (1 if bad else 0)
        io.send(h + big[:1000])
        time.sleep(0.05)
        io.send(big[1000:40000])
        time.sleep(0.05)
        io.send(big[40000:] + struct.pack("<I", dg)[:2])
        time.sleep(0.05)
        io.send(struct.pack("<I", dg)[2:])
        cqe = P.parse_cqe(io.recv_pdu()["raw"][8:24])
        assert cqe["cid"] == cid and cqe["sc"] == (0x22 if bad else 0), cqe
        if not bad:
            assert io.read(1, 256, 128)[1] == big
            good = big
    assert io.read(1, 256, 128)[1] == good
    io.close()
    a.close()


def queue_reads(q, reads, nsid=1, bs=512):
    """Send every read [(slba, nlb)] at once; return their CIDs."""
    cids = []
    for slba, nlb in reads:
        cid = q.next_cid()
        q.capsule(P.sqe(0x02, cid, nsid, (0, nlb * bs, 0x5A), (slba, 0, nlb - 1, 0, 0, 0)))
        cids.append(cid)
    return cids


def collect(q, cids):
    """Read the answers to `cids` (any order): [(cqe, data)] in `cids` order."""
    data = {c: b"" for c in cids}
    done = {}
    while len(done) < len(cids):
        p = q.recv_pdu()
        if p["type"] == P.C2H_DATA:
            cccid, _, datao, datal = struct.unpack("<HHII", p["raw"][8:20])
            assert cccid in data and cccid not in done and datao == len(data[cccid]), p["raw"][:24]
            assert datal == len(p["data"])
            data[cccid] += p["data"]
            continue
        assert p["type"] == P.RSP, "unexpected PDU type %d" % p["type"]
        cqe = P.parse_cqe(p["raw"][8:24])
        assert cqe["cid"] in data and cqe["cid"] not in done, cqe
        done[cqe["cid"]] = cqe
    return [(done[c], data[c]) for c in cids]


@pytest.mark.parametrize("polling", ["interrupt", "busy"])
@pytest.mark.parametrize("digests", [(False, False), (True, True)], ids=["plain", "digests"])
def test_slow_reader_gets_every_read(tgt_factory, polling, digests):
    """A host reading slowly through a small receive buffer, 3 KB at a time:
    reads of 128 KiB (the MDTS) and of 3.5 KiB queued at once fill its socket,
    so the target's gathered sends stop part way (in PDU headers, digests or
    a bdev buffer sent in place) and go on as the host reads: every byte
    arrives, in order, intact. A read over the MDTS is refused, the stream
    stays in sync. Then a host that closes with sends pending leaves the
    target serving the others. Busy-polling, as in production, and
    --interrupt-mode (the wakeups on a full socket)."""
    tgt = tgt_factory(busy=(polling == "busy"))
    port = free_port()
    setup_target(tgt, port, blocks=65536)
    hd, dd = digests
    # KATO 0: the probe's digests (CRC32C in Python) make this test slow.
    a = P.admin_session(ADDR, port, NQN, kato=0, hdgst=hd, ddgst=dd)
    io = P.io_session(ADDR, port, NQN, a.cntlid, hdgst=hd, ddgst=dd)
    N = 8
    chunks = [os.urandom(128 * 1024) for _ in range(N)]
    for k, c in enumerate(chunks):
        io.write(1, k * 256, c)
    q = P.Conn(ADDR, port, hdgst=hd, ddgst=dd, rcvbuf=8192)
    q.icreq()
    q.connect(NQN, qid=2, sqsize=63, cntlid=a.cntlid)
    reads, want = [], []
    for k in range(N):
        reads += [(k * 256, 256), (k * 256 + 3, 7)]
        want += [chunks[k], chunks[k][3 * 512:10 * 512]]
    cids = queue_reads(q, reads)
    time.sleep(0.3)  # the target fills the socket meanwhile
    q.slow = (3000, 0.0002)
    got = collect(q, cids)
    for (cqe, data), w in zip(got, want):
        assert (cqe["sct"], cqe["sc"]) == (0, 0), cqe
        assert data == w
    q.slow = None
    # Over the MDTS (128 KiB + one block): refused; the next read is fine.
    cqe, _ = q.read(1, 0, 257, check=False)
    assert (cqe["sct"], cqe["sc"], cqe["dnr"]) == (0, 0x0F, 1), cqe
    assert q.read(1, 256, 256)[1] == chunks[1]
    q.close()
    # A host that goes away with reads still being sent to it.
    gone = P.Conn(ADDR, port, hdgst=hd, ddgst=dd, rcvbuf=8192)
    gone.icreq()
    gone.connect(NQN, qid=3, sqsize=63, cntlid=a.cntlid)
    queue_reads(gone, [(k * 256, 256) for k in range(N)])
    time.sleep(0.2)
    gone.close()
    assert io.read(1, 512, 256)[1] == chunks[2]
    deadline = time.monotonic() + 10
    while sorted(qp["qid"] for qp in tgt.rpc("nvmf_subsystem_get_qpairs", nqn=NQN)) != [0, 1]:
        assert time.monotonic() < deadline, tgt.rpc("nvmf_subsystem_get_qpairs", nqn=NQN)
        time.sleep(0.05)
    stats = tgt.rpc("nvmf_get_stats")
    assert sum(g["pending_bdev_io"] for g in stats["poll_groups"]) == 0
    assert "panicked" not in tgt.log()
    io.close()
    a.close()


@pytest.mark.parametrize("polling", ["interrupt", "busy"])
def test_stop_with_hosts_connected(tgt_factory, polling):
    """SIGTERM while a host holds an admin and an I/O queue (the I/O queue
    with a namespace channel open): the target exits 0, its connections
    closed before the reactors stop."""
    tgt = tgt_factory(busy=(polling == "busy"))
    port = free_port()
    setup_target(tgt, port)
    a = P.admin_session(ADDR, port, NQN)
    io = P.io_session(ADDR, port, NQN, a.cntlid)
    data = os.urandom(4096)
    io.write(1, 0, data)
    assert io.read(1, 0, 8)[1] == data
    tgt.stop("SIGTERM")
    assert io.expect_eof() and a.expect_eof()
    io.close()
    a.close()


def _term(port, payload, icreq=True, **kw):
    c = P.Conn(ADDR, port, **kw)
    if icreq:
        c.icreq()
    c.send(payload)
    fes, fei = c.expect_term()
    assert c.expect_eof()
    c.close()
    return fes, fei


def test_malformed_pdus_terminate_connection(tgt):
    port = free_port()
    setup_target(tgt, port)
    good_cmd = P.sqe(0x06, 1, 0, (0, 4096, 0x5A), (1, 0, 0, 0, 0, 0))
    cases = []
    # A capsule before the ICReq: PDU sequence error.
    cases.append(("capsule-before-icreq",
                  dict(payload=struct.pack("<BBBBI", P.CMD, 0, 72, 0, 72) + good_cmd, icreq=False),
                  (2, None)))
    # ICReq with PFV 1: invalid header field at offset 8.
    icreq_pfv = struct.pack("<BBBBIHBBI", 0, 0, 128, 0, 128, 1, 0, 0, 0) + bytes(112)
    cases.append(("icreq-pfv", dict(payload=icreq_pfv, icreq=False), (1, 8)))
    # A second ICReq.
    icreq = struct.pack("<BBBBIHBBI", 0, 0, 128, 0, 128, 0, 0, 0, 0) + bytes(112)
    cases.append(("second-icreq", dict(payload=icreq), (2, None)))
    # Unknown PDU type 8; controller-to-host type from a host.
    cases.append(("type-8", dict(payload=struct.pack("<BBBBI", 8, 0, 24, 0, 24) + bytes(16)), (1, 0)))
    cases.append(("c2h-type", dict(payload=struct.pack("<BBBBI", P.RSP, 0, 24, 0, 24) + bytes(16)),
                  (1, 0)))
    # Wrong HLEN for a capsule.
    cases.append(("bad-hlen", dict(payload=struct.pack("<BBBBI", P.CMD, 0, 70, 0, 72) + good_cmd),
                  (1, 2)))
    # Header digest flag without negotiation; wrong header digest when negotiated.
    cases.append(("hdgst-flag", dict(payload=struct.pack("<BBBBI", P.CMD, 1, 72, 0, 76) + good_cmd
                                     + bytes(4)), (1, 1)))
    bad = struct.pack("<BBBBI", P.CMD, 1, 72, 0, 76) + good_cmd
    cases.append(("hdgst-wrong", dict(payload=bad + struct.pack("<I", P.crc32c(bad) ^ 1), hdgst=True),
                  (3, None)))
    # In-capsule data larger than allowed (16 KiB on the admin queue).
    big = P.sqe(0x7F, 1, 1, (0, 16384, 0x01))
    cases.append(("icd-too-big", dict(payload=struct.pack("<BBBBI", P.CMD, 0, 72, 72, 72 + 16384)
                                      + big + bytes(16384)), (5, 4)))
    # Keyed SGL (RDMA only): unsupported parameter at the SGL type byte.
    keyed = P.sqe(0x06, 1, 0, (0, 4096, 0x40), (1, 0, 0, 0, 0, 0))
    cases.append(("keyed-sgl", dict(payload=struct.pack("<BBBBI", P.CMD, 0, 72, 0, 72) + keyed),
                  (6, 8 + 39)))
    # H2CData for a transfer tag never issued.
    h2c = struct.pack("<BBBBIHHII4x", P.H2C_DATA, P.LAST_PDU, 24, 24, 24 + 512, 1, 77, 0, 512)
    cases.append(("h2c-unknown-ttag", dict(payload=h2c + bytes(512)), (1, 10)))
    # PLEN smaller than HLEN / ICD length different from the SGL length.
    cases.append(("short-plen", dict(payload=struct.pack("<BBBBI", P.CMD, 0, 72, 0, 60) + good_cmd),
                  (1, None)))
    icd_cmd = P.sqe(0x7F, 1, 1, (0, 1024, 0x01))
    cases.append(("icd-len-mismatch", dict(payload=struct.pack("<BBBBI", P.CMD, 0, 72, 72, 72 + 512)
                                           + icd_cmd + bytes(512)), (1, 4)))
    for name, kw, (fes, fei) in cases:
        got_fes, got_fei = _term(port, **kw)
        assert got_fes == fes, "%s: FES %d, expected %d" % (name, got_fes, fes)
        if fei is not None:
            assert got_fei == fei, "%s: FEI %d, expected %d" % (name, got_fei, fei)
    # Garbage, a half PDU and an abrupt close: no TermReq needed, no crash.
    c = P.Conn(ADDR, port)
    c.send(bytes(range(256)) * 4)
    c.expect_eof()
    c.close()
    c = P.Conn(ADDR, port)
    c.icreq()
    c.send(struct.pack("<BBBBI", P.CMD, 0, 72, 0, 72) + good_cmd[:30])
    c.close()
    # The target still serves everyone else.
    a = P.admin_session(ADDR, port, NQN)
    io = P.io_session(ADDR, port, NQN, a.cntlid)
    d = os.urandom(8192)
    io.write(1, 10, d)
    assert io.read(1, 10, 16)[1] == d
    io.close()
    a.close()
    assert tgt.running()
    assert "panicked" not in tgt.log()


def test_commands_before_connect_and_enable(tgt):
    port = free_port()
    setup_target(tgt, port)
    c = P.Conn(ADDR, port)
    c.icreq()
    cqe, _ = c.cmd(0x06, 0, (1, 0, 0, 0, 0, 0), read_len=4096, check=False)
    assert (cqe["sct"], cqe["sc"]) == (0, 0x0C)
    c.connect(NQN)
    cqe, _ = c.cmd(0x06, 0, (1, 0, 0, 0, 0, 0), read_len=4096, check=False)
    assert (cqe["sct"], cqe["sc"]) == (0, 0x0C)
    # I/O connect before CC.EN: refused.
    cntlid = tgt.rpc("nvmf_subsystem_get_controllers", nqn=NQN)[0]["cntlid"]
    io = P.Conn(ADDR, port)
    io.icreq()
    cqe = io.connect(NQN, qid=1, cntlid=cntlid, check=False)
    assert (cqe["sct"], cqe["sc"]) == (1, 0x82)
    io.close()
    # Unknown property offset, second Connect.
    cqe, _ = c.cmd(0x7F, 0x04, (0, 0x40, 0, 0, 0, 0), check=False)
    assert (cqe["sct"], cqe["sc"]) == (0, 0x02)
    cqe = c.connect(NQN, check=False)
    assert (cqe["sct"], cqe["sc"]) == (0, 0x0C)
    c.enable()
    assert len(c.identify(1)) == 4096
    # EN 1 -> 0 resets: RDY clears, admin queue stays.
    c.prop_set(0x14, 0x00460000)
    assert c.prop_get(0x1C) & 1 == 0
    c.close()
