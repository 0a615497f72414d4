"""The JSON-RPC wire protocol, spoken with a raw AF_UNIX socket (rpc-contract.md §1.2-§1.4, §4)."""

import json
import time

import pytest

from conftest import DECODE_FAILED, RawConn

VERSION_REQ = {"jsonrpc": "2.0", "method": "spdk_get_version", "id": 1}


def assert_version_reply(reply, req_id):
    assert reply.get("jsonrpc") == "2.0", reply
    assert reply.get("id") == req_id, reply
    assert "error" not in reply, reply
    assert reply["result"]["fields"]["major"] == 26, reply


def assert_error(reply, code, message=None, req_id="any"):
    assert reply.get("jsonrpc") == "2.0", reply
    assert "result" not in reply, reply
    err = reply.get("error")
    assert isinstance(err, dict), reply
    assert err.get("code") == code, reply
    if message is not None:
        assert err.get("message") == message, reply
    assert set(err) == {"code", "message"}, "error object has extra members: %r" % err
    if req_id != "any":
        assert reply.get("id") == req_id, reply


def bdev_names(tgt):
    return sorted(b["name"] for b in tgt.rpc("bdev_get_bdevs"))


def test_request_split_across_sends(raw):
    c = raw()
    data = json.dumps({"jsonrpc": "2.0", "method": "spdk_get_version", "id": 5}).encode()
    c.send(data[:17])
    assert c.silent_for(0.3), "replied to half a request: %r" % c.text
    c.send(data[17:])
    assert_version_reply(c.recv(), 5)


def test_request_split_byte_by_byte(raw):
    c = raw()
    data = json.dumps({"jsonrpc": "2.0", "method": "rpc_get_methods", "id": "abc"}).encode()
    for i in range(len(data)):
        c.send(data[i:i + 1])
        time.sleep(0.001)
    reply = c.recv()
    assert reply["id"] == "abc" and "spdk_get_version" in reply["result"]


def test_two_requests_in_one_send(raw):
    c = raw()
    c.send(json.dumps({"jsonrpc": "2.0", "method": "spdk_get_version", "id": 1}) +
           json.dumps({"jsonrpc": "2.0", "method": "rpc_get_methods", "id": 2}))
    replies = [c.recv(), c.recv()]
    by_id = {r["id"]: r for r in replies}
    assert set(by_id) == {1, 2}, replies
    assert_version_reply(by_id[1], 1)
    assert "bdev_get_bdevs" in by_id[2]["result"]


def test_pretty_printed_request(raw):
    # What rpc.py sends: indent=2, no trailing newline.
    c = raw()
    c.send(json.dumps({"jsonrpc": "2.0", "method": "spdk_get_version", "id": 9}, indent=2))
    assert_version_reply(c.recv(), 9)
    # And the captured rpc.py bdev_malloc_create request, verbatim.
    c.send('{\n  "jsonrpc": "2.0",\n  "method": "bdev_malloc_create",\n  "id": 10,\n  "params": {\n'
           '    "num_blocks": 2048,\n    "block_size": 512,\n    "name": "Malloc0",\n'
           '    "md_interleave": false,\n    "dif_is_head_of_md": false\n  }\n}')
    assert c.recv() == {"jsonrpc": "2.0", "id": 10, "result": "Malloc0"}


def test_reply_ends_with_newline(raw):
    c = raw()
    c.send(VERSION_REQ)
    assert_version_reply(c.recv(), 1)
    deadline = time.monotonic() + 2
    while not c.text and time.monotonic() < deadline:
        c._fill(deadline - time.monotonic())
    assert c.text.startswith("\n"), "reply not followed by a newline: %r" % c.raw


def test_success_reply_has_no_error_key(raw):
    c = raw()
    for i, req in enumerate([VERSION_REQ,
                             {"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 2},
                             {"jsonrpc": "2.0", "method": "bdev_wait_for_examine", "id": 3}]):
        reply = c.request(req)
        assert "error" not in reply and "result" in reply, reply
        assert set(reply) == {"jsonrpc", "id", "result"}, reply


def test_id_kinds_are_echoed(raw):
    c = raw()
    for req_id in ["str-id", 0, 123456789, -4, "x" * 100]:
        reply = c.request({"jsonrpc": "2.0", "method": "spdk_get_version", "id": req_id})
        assert "id" in reply and reply["id"] == req_id, reply
        assert "result" in reply


def test_jsonrpc_member_is_optional(raw):
    c = raw()
    assert_version_reply(c.request({"method": "spdk_get_version", "id": 3}), 3)


def test_params_null_counts_as_absent(raw):
    c = raw()
    assert_version_reply(c.request({"jsonrpc": "2.0", "method": "spdk_get_version", "id": 4,
                                    "params": None}), 4)


def test_batch(raw):
    c = raw()
    c.send([{"jsonrpc": "2.0", "method": "spdk_get_version", "id": 1},
            {"jsonrpc": "2.0", "method": "spdk_get_version"},          # notification
            {"jsonrpc": "2.0", "method": "rpc_get_methods", "id": 2}])
    reply = c.recv()
    assert isinstance(reply, list), reply
    assert len(reply) == 2, reply
    by_id = {r["id"]: r for r in reply}
    assert set(by_id) == {1, 2}, reply
    assert_version_reply(by_id[1], 1)
    # one reply for the batch, nothing more
    assert c.silent_for(0.3), c.text


def test_batch_with_error_entry(raw):
    c = raw()
    c.send([{"jsonrpc": "2.0", "method": "spdk_get_version", "id": 1},
            {"jsonrpc": "2.0", "method": "no_such_method", "id": 2}])
    reply = c.recv()
    assert isinstance(reply, list) and len(reply) == 2, reply
    by_id = {r["id"]: r for r in reply}
    assert_version_reply(by_id[1], 1)
    assert_error(by_id[2], -32601, "Method not found")


def test_empty_batch(raw):
    c = raw()
    c.send("[]")
    reply = c.recv()
    assert isinstance(reply, dict), "an empty batch gets one error object, got %r" % (reply,)
    assert_error(reply, -32600, "Invalid request")
    # the connection is still usable
    assert_version_reply(c.request(VERSION_REQ), 1)


def test_wrong_jsonrpc_version(raw):
    c = raw()
    reply = c.request({"jsonrpc": "1.0", "method": "spdk_get_version", "id": 1})
    assert_error(reply, -32600, "Invalid request")


def test_invalid_envelopes(raw):
    c = raw()
    for bad in [{"jsonrpc": "2.0", "id": 1},                                  # no method
                {"jsonrpc": "2.0", "method": 5, "id": 1},                     # method not a string
                {"jsonrpc": "2.0", "method": "spdk_get_version", "id": {"x": 1}},  # bad id type
                {"jsonrpc": 2.0, "method": "spdk_get_version", "id": 1}]:     # version not a string
        reply = c.request(bad)
        assert_error(reply, -32600, "Invalid request")
    assert_version_reply(c.request(VERSION_REQ), 1)


def test_top_level_scalar_is_invalid_request(raw):
    c = raw()
    c.send('"hello"')
    assert_error(c.recv(), -32600, "Invalid request")
    assert_version_reply(c.request(VERSION_REQ), 1)


def test_notification_success_gets_no_reply(raw):
    c = raw()
    c.send({"jsonrpc": "2.0", "method": "spdk_get_version"})
    c.send({"jsonrpc": "2.0", "method": "spdk_get_version", "id": 7})
    assert_version_reply(c.recv(), 7)
    assert c.silent_for(0.5), "extra data after the only expected reply: %r" % c.text


def test_notification_that_acts(tgt, raw):
    c = raw()
    c.send({"jsonrpc": "2.0", "method": "bdev_malloc_create",
            "params": {"name": "Quiet0", "num_blocks": 16, "block_size": 512}})
    assert c.silent_for(0.3)
    assert tgt.bdev("Quiet0")["num_blocks"] == 16


def test_notification_error_is_sent_with_null_id(raw):
    c = raw()
    c.send({"jsonrpc": "2.0", "method": "no_such_method"})
    reply = c.recv()
    assert_error(reply, -32601, "Method not found", req_id=None)


def test_malformed_json_closes_connection(tgt, raw):
    c = raw()
    c.send(b'{"jsonrpc": "2.0", "method": ]')
    reply = c.recv()
    assert_error(reply, -32700, "Parse error", req_id=None)
    assert c.closed_by_peer(5.0), "connection left open after a parse error"
    # a new connection works
    c2 = raw()
    assert_version_reply(c2.request(VERSION_REQ), 1)
    assert tgt.running()


def test_garbage_bytes(tgt, raw):
    c = raw()
    c.send(b"\x00\xffhello")
    reply = c.recv()
    assert_error(reply, -32700, "Parse error")
    assert c.closed_by_peer(5.0)
    assert tgt.rpc("spdk_get_version")["fields"]["minor"] == 9


def test_half_close_still_gets_reply(raw):
    c = raw()
    c.send(json.dumps({"jsonrpc": "2.0", "method": "spdk_get_version", "id": 11}, indent=2))
    c.shutdown_write()
    data = c.read_until_closed(timeout=10)
    values = []
    dec = json.JSONDecoder()
    text = data.decode().strip()
    while text:
        v, i = dec.raw_decode(text)
        values.append(v)
        text = text[i:].strip()
    assert len(values) == 1, values
    assert_version_reply(values[0], 11)
    assert data.endswith(b"\n")


def test_half_close_two_requests(raw):
    c = raw()
    c.send(json.dumps({"jsonrpc": "2.0", "method": "spdk_get_version", "id": 1}) +
           json.dumps({"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 2}))
    c.shutdown_write()
    data = c.read_until_closed(timeout=10).decode()
    dec = json.JSONDecoder()
    ids = []
    text = data.strip()
    while text:
        v, i = dec.raw_decode(text)
        ids.append(v["id"])
        text = text[i:].strip()
    assert sorted(ids) == [1, 2], data


def test_many_connections(tgt):
    conns = [RawConn(tgt.sock) for _ in range(20)]
    try:
        for i, c in enumerate(conns):
            c.send({"jsonrpc": "2.0", "method": "spdk_get_version", "id": i})
        for i, c in enumerate(conns):
            assert_version_reply(c.recv(), i)
    finally:
        for c in conns:
            c.close()


def test_large_request(tgt, raw):
    # A request well over one recv() but under the 256 KiB per-connection buffer.
    c = raw()
    req = {"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 1,
           "params": {"name": "x" * 100000}}
    reply = c.request(req)
    assert_error(reply, -19, "No such device", req_id=1)


# --- parameter decoding ------------------------------------------------------------

def test_unknown_param_rejected(tgt, raw):
    c = raw()
    reply = c.request({"jsonrpc": "2.0", "method": "bdev_malloc_create", "id": 1,
                       "params": {"name": "x", "num_blocks": 8, "block_size": 512, "bogus": 1}})
    assert_error(reply, -32603, DECODE_FAILED, req_id=1)
    assert tgt.rpc_err("bdev_get_bdevs", name="x") == (-19, "No such device")


def test_explicit_false_accepted(tgt, raw):
    c = raw()
    reply = c.request({"jsonrpc": "2.0", "method": "bdev_malloc_create", "id": 2,
                       "params": {"name": "F0", "num_blocks": 8, "block_size": 512,
                                  "md_interleave": False, "dif_is_head_of_md": False}})
    assert reply == {"jsonrpc": "2.0", "id": 2, "result": "F0"}
    reply = c.request({"jsonrpc": "2.0", "method": "bdev_get_iostat", "id": 3,
                       "params": {"per_channel": False}})
    assert "error" not in reply, reply


BAD_MALLOC_PARAMS = {
    # unsigned integers: no negatives, no fractions, no exponents
    "negative_num_blocks": '{"name":"b","num_blocks":-8,"block_size":512}',
    "negative_block_size": '{"name":"b","num_blocks":8,"block_size":-512}',
    "fraction": '{"name":"b","num_blocks":8.5,"block_size":512}',
    "exponent": '{"name":"b","num_blocks":1e3,"block_size":512}',
    "exponent_upper": '{"name":"b","num_blocks":8E0,"block_size":512}',
    "u32_overflow": '{"name":"b","num_blocks":8,"block_size":4294967808}',
    # types
    "number_as_string": '{"name":"b","num_blocks":"8","block_size":512}',
    "string_null": '{"name":null,"num_blocks":8,"block_size":512}',
    "string_as_number": '{"name":5,"num_blocks":8,"block_size":512}',
    "bool_as_int": '{"name":"b","num_blocks":8,"block_size":512,"md_interleave":0}',
    "bool_as_string": '{"name":"b","num_blocks":8,"block_size":512,"md_interleave":"false"}',
    "missing_required": '{"name":"b","block_size":512}',
    "duplicate_key": '{"name":"b","num_blocks":8,"num_blocks":16,"block_size":512}',
    "unknown_key": '{"name":"b","num_blocks":8,"block_size":512,"bogus":1}',
}


@pytest.mark.parametrize("case", sorted(BAD_MALLOC_PARAMS))
def test_bad_params_rejected(tgt, raw, case):
    c = raw()
    reply = c.request('{"jsonrpc":"2.0","method":"bdev_malloc_create","id":1,"params":%s}'
                      % BAD_MALLOC_PARAMS[case])
    assert_error(reply, -32603, DECODE_FAILED, req_id=1)
    assert bdev_names(tgt) == [], "a rejected request created a bdev"


def test_params_absent_for_required(tgt, raw):
    c = raw()
    reply = c.request({"jsonrpc": "2.0", "method": "bdev_malloc_create", "id": 99})
    assert_error(reply, -32603, DECODE_FAILED, req_id=99)
    assert bdev_names(tgt) == []


def test_duplicate_keys_rejected(tgt, raw):
    c = raw()
    reply = c.request('{"jsonrpc":"2.0","method":"bdev_malloc_create","id":1,'
                      '"params":{"name":"dup","num_blocks":8,"num_blocks":16,"block_size":512}}')
    assert_error(reply, -32603, DECODE_FAILED)
    assert tgt.rpc_err("bdev_get_bdevs", name="dup") == (-19, "No such device")


def test_replies_in_completion_order(tgt, raw):
    """A slow request does not hold back a fast one sent after it on the same connection."""
    c = raw()
    c.send({"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 1,
            "params": {"name": "Later0", "timeout": 5000}})
    c.send({"jsonrpc": "2.0", "method": "spdk_get_version", "id": 2})
    first = c.recv(timeout=3)
    assert first["id"] == 2, "the fast request waited behind the slow one: %r" % first
    tgt.rpc("bdev_null_create", name="Later0", num_blocks=8, block_size=512)
    second = c.recv(timeout=5)
    assert second["id"] == 1 and second["result"][0]["name"] == "Later0", second


def test_kill_instance_replies_before_exit(tgt, raw):
    c = raw()
    reply = c.request({"jsonrpc": "2.0", "method": "spdk_kill_instance", "id": 1,
                       "params": {"sig_name": "SIGTERM"}})
    assert reply == {"jsonrpc": "2.0", "id": 1, "result": True}, reply
    assert tgt.wait_exit() == 0, tgt.log()
    assert not tgt.sock.exists() and not tgt.lock.exists()


def test_cli_batch_mode(tgt):
    """spdk-rpc -b sends the stdin commands as one JSON-RPC batch array."""
    cp = tgt.cli("-b", input="bdev_malloc_create -b B1 1 512\nbdev_null_create B2 1 512\n"
                             "spdk_get_version\n")
    assert cp.returncode == 0, cp
    assert sorted(b["name"] for b in tgt.rpc("bdev_get_bdevs")) == ["B1", "B2"]
    assert "B1" in cp.stdout and "SPDK v26.09" in cp.stdout, cp.stdout
