"""A small raw-socket NVMe/TCP host for end-to-end tests of the target.

Written from the NVMe/TCP transport specification (not from the target's
code): it builds PDUs byte by byte with struct, so that a shared wrong
constant cannot hide a bug on both sides. It can also send deliberately
malformed PDUs and read the C2HTermReq that must come back.
"""

import socket
import struct
import time
import uuid

DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:6f2b6a58-3b8e-4b8e-9c5e-4f1c3ad0c0de"

ICREQ, ICRESP, H2C_TERM, C2H_TERM, CMD, RSP, H2C_DATA, C2H_DATA, R2T = 0, 1, 2, 3, 4, 5, 6, 7, 9
HDGSTF, DDGSTF, LAST_PDU, SUCCESS = 1, 2, 4, 8


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283


class Closed(Exception):
    pass


class Status(Exception):
    def __init__(self, cqe):
        self.cqe = cqe
        super().__init__("NVMe status sct %#x sc %#x dnr %d" % (cqe["sct"], cqe["sc"], cqe["dnr"]))


def parse_cqe(b):
    dw0, dw1, sqhd, sqid, cid, st = struct.unpack("<IIHHHH", b[:16])
    return {"dw0": dw0, "dw1": dw1, "sqhd": sqhd, "sqid": sqid, "cid": cid,
            "sct": (st >> 9) & 7, "sc": (st >> 1) & 0xFF, "dnr": st >> 15, "status": st}


def sqe(opc, cid, nsid=0, sgl=(0, 0, 0x5A), cdw=(0, 0, 0, 0, 0, 0), flags=0x40):
    addr, length, kind = sgl
    b = struct.pack("<BBHI", opc, flags, cid, nsid) + bytes(16)
    b += struct.pack("<QI3xB", addr, length, kind)
    b += struct.pack("<6I", *cdw)
    assert len(b) == 64
    return b


class Conn:
    def __init__(self, addr, port, hdgst=False, ddgst=False, timeout=10.0, rcvbuf=None):
        if rcvbuf is None:
            self.s = socket.create_connection((addr, port), timeout=timeout)
        else:
            # Set before connecting: the window offered to the target stays small.
            self.s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
            self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.s.settimeout(timeout)
            self.s.connect((addr, port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # (bytes per recv, pause before each): a host that reads slowly.
        self.slow = None
        self.hdgst, self.ddgst = hdgst, ddgst
        self.cid = 0
        self.maxh2c = 0

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass

    # -- raw I/O -----------------------------------------------------------

    def send(self, b):
        self.s.sendall(b)

    def recv_exact(self, n):
        out = b""
        while len(out) < n:
            want = n - len(out)
            if self.slow:
                want = min(want, self.slow[0])
                time.sleep(self.slow[1])
            chunk = self.s.recv(want)
            if not chunk:
                raise Closed("connection closed after %d of %d bytes" % (len(out), n))
            out += chunk
        return out

    def recv_pdu(self):
        ch = self.recv_exact(8)
        ptype, flags, hlen, pdo, plen = struct.unpack("<BBBBI", ch)
        rest = self.recv_exact(plen - 8)
        pdu = ch + rest
        hd = 4 if flags & HDGSTF else 0
        if hd:
            want = struct.unpack("<I", pdu[hlen:hlen + 4])[0]
            assert crc32c(pdu[:hlen]) == want, "bad header digest from target"
        data = b""
        if ptype in (C2H_DATA,) or (ptype == C2H_TERM and plen > hlen):
            start = pdo if pdo else hlen + hd
            end = plen - (4 if flags & DDGSTF else 0)
            data = pdu[start:end]
            if flags & DDGSTF:
                assert crc32c(data) == struct.unpack("<I", pdu[end:end + 4])[0], "bad data digest"
        return {"type": ptype, "flags": flags, "hlen": hlen, "pdo": pdo, "plen": plen, "raw": pdu,
                "data": data}

    def icreq(self, pfv=0, maxr2t=0):
        dg = (1 if self.hdgst else 0) | (2 if self.ddgst else 0)
        b = struct.pack("<BBBBIHBBI", ICREQ, 0, 128, 0, 128, pfv, 0, dg, maxr2t) + bytes(112)
        self.send(b)
        r = self.recv_pdu()
        if r["type"] != ICRESP:
            return r
        pfv, cpda, dgst, maxh2c = struct.unpack("<HBBI", r["raw"][8:16])
        assert r["plen"] == 128 and r["hlen"] == 128
        assert cpda == 0 and dgst == dg and maxh2c >= 4096 and maxh2c % 4 == 0
        self.maxh2c = maxh2c
        return r

    def capsule(self, sqe_bytes, icd=b""):
        hd = 4 if self.hdgst else 0
        flags = HDGSTF if self.hdgst else 0
        if icd:
            pdo = 72 + hd
            dd = 4 if self.ddgst else 0
            if dd:
                flags |= DDGSTF
            plen = pdo + len(icd) + dd
        else:
            pdo, dd, plen = 0, 0, 72 + hd
        h = struct.pack("<BBBBI", CMD, flags, 72, pdo, plen) + sqe_bytes
        if hd:
            h += struct.pack("<I", crc32c(h))
        b = h + icd
        if icd and dd:
            b += struct.pack("<I", crc32c(icd))
        self.send(b)

    def h2c_data(self, cid, ttag, off, data, last):
        hd = 4 if self.hdgst else 0
        dd = 4 if self.ddgst else 0
        flags = (HDGSTF if hd else 0) | (DDGSTF if dd else 0) | (LAST_PDU if last else 0)
        pdo = 24 + hd
        h = struct.pack("<BBBBIHHII4x", H2C_DATA, flags, 24, pdo, pdo + len(data) + dd, cid, ttag,
                        off, len(data))
        if hd:
            h += struct.pack("<I", crc32c(h))
        b = h + data
        if dd:
            b += struct.pack("<I", crc32c(data))
        self.send(b)

    def next_cid(self):
        self.cid = (self.cid + 1) & 0xFFFF
        return self.cid

    # -- commands ------------------------------------------------------------

    def cmd(self, opc, nsid=0, cdw=(0, 0, 0, 0, 0, 0), read_len=0, write=b"", icd_max=8192,
            check=True):
        """Run one command to completion; returns (cqe, data)."""
        cid = self.next_cid()
        if write and len(write) <= icd_max:
            self.capsule(sqe(opc, cid, nsid, (0, len(write), 0x01), cdw), write)
        elif write:
            self.capsule(sqe(opc, cid, nsid, (0, len(write), 0x5A), cdw))
        else:
            self.capsule(sqe(opc, cid, nsid, (0, read_len, 0x5A), cdw))
        data = b""
        while True:
            p = self.recv_pdu()
            if p["type"] == R2T:
                cccid, ttag, r2to, r2tl = struct.unpack("<HHII", p["raw"][8:20])
                assert cccid == cid
                off, end = r2to, r2to + r2tl
                step = self.maxh2c or 65536
                while off < end:
                    n = min(step, end - off)
                    self.h2c_data(cid, ttag, off, write[off:off + n], off + n == end)
                    off += n
                continue
            if p["type"] == C2H_DATA:
                cccid, _, datao, datal = struct.unpack("<HHII", p["raw"][8:20])
                assert cccid == cid and datao == len(data)
                data += p["data"]
                if p["flags"] & SUCCESS:
                    return {"dw0": 0, "dw1": 0, "sct": 0, "sc": 0, "dnr": 0, "cid": cid}, data
                continue
            if p["type"] == RSP:
                cqe = parse_cqe(p["raw"][8:24])
                assert cqe["cid"] == cid, "CQE for cid %d, expected %d" % (cqe["cid"], cid)
                if check and (cqe["sct"] or cqe["sc"]):
                    raise Status(cqe)
                return cqe, data
            if p["type"] == C2H_TERM:
                raise Closed("C2HTermReq fes %d" % struct.unpack("<H", p["raw"][8:10]))
            raise AssertionError("unexpected PDU type %d" % p["type"])

    def connect(self, subnqn, qid=0, sqsize=31, kato=0, cntlid=0xFFFF, hostnqn=HOSTNQN,
                hostid=None, cattr=0, check=True):
        hid = (hostid or uuid.uuid5(uuid.NAMESPACE_DNS, hostnqn)).bytes
        data = bytearray(1024)
        data[0:16] = hid
        data[16:18] = struct.pack("<H", cntlid)
        sn = subnqn.encode()
        hn = hostnqn.encode()
        data[256:256 + len(sn)] = sn
        data[512:512 + len(hn)] = hn
        cdw10 = qid << 16
        cdw11 = sqsize | (cattr << 16)
        cid = self.next_cid()
        self.capsule(sqe(0x7F, cid, 0x01, (0, 1024, 0x01), (cdw10, cdw11, kato, 0, 0, 0)),
                     bytes(data))
        p = self.recv_pdu()
        assert p["type"] == RSP, "expected a CQE, got PDU type %d" % p["type"]
        cqe = parse_cqe(p["raw"][8:24])
        if check and (cqe["sct"] or cqe["sc"]):
            raise Status(cqe)
        return cqe

    def prop_get(self, ofst, size8=False):
        cqe, _ = self.cmd(0x7F, 0x04, (1 if size8 else 0, ofst, 0, 0, 0, 0))
        return cqe["dw0"] | (cqe["dw1"] << 32)

    def prop_set(self, ofst, val):
        return self.cmd(0x7F, 0x00, (0, ofst, val & 0xFFFFFFFF, val >> 32, 0, 0))

    def enable(self):
        self.prop_set(0x14, 0x00460000)
        self.prop_set(0x14, 0x00460001)
        assert self.prop_get(0x1C) & 1 == 1

    def identify(self, cns, nsid=0):
        return self.cmd(0x06, nsid, (cns, 0, 0, 0, 0, 0), read_len=4096)[1]

    def get_log(self, lid, length, lpo=0, nsid=0xFFFFFFFF, rae=False, check=True):
        numd = length // 4 - 1
        cdw10 = lid | (0x8000 if rae else 0) | ((numd & 0xFFFF) << 16)
        cdw11 = numd >> 16
        return self.cmd(0x02, nsid, (cdw10, cdw11, lpo & 0xFFFFFFFF, lpo >> 32, 0, 0),
                        read_len=length, check=check)

    def set_features(self, fid, cdw11, check=True):
        return self.cmd(0x09, 0, (fid, cdw11, 0, 0, 0, 0), check=check)[0]

    def read(self, nsid, slba, nlb, bs=512, check=True):
        return self.cmd(0x02, nsid, (slba & 0xFFFFFFFF, slba >> 32, nlb - 1, 0, 0, 0),
                        read_len=nlb * bs, check=check)

    def write(self, nsid, slba, data, bs=512, icd_max=4096, fua=False, check=True):
        nlb = len(data) // bs
        cdw12 = (nlb - 1) | ((1 << 30) if fua else 0)
        return self.cmd(0x01, nsid, (slba & 0xFFFFFFFF, slba >> 32, cdw12, 0, 0, 0),
                        write=data, icd_max=icd_max, check=check)

    def flush(self, nsid, check=True):
        """NVM Flush (opcode 00h)."""
        return self.cmd(0x00, nsid, check=check)

    def deallocate(self, nsid, ranges, check=True):
        """Dataset Management (opcode 09h) with the Deallocate attribute (AD, CDW11 bit 2)
        over `ranges` [(slba, nlb)]: 16-byte range descriptors (context attributes, length
        in blocks, starting LBA), NR = count - 1 in CDW10."""
        assert 1 <= len(ranges) <= 256
        data = b"".join(struct.pack("<IIQ", 0, nlb, slba) for slba, nlb in ranges)
        return self.cmd(0x09, nsid, (len(ranges) - 1, 1 << 2, 0, 0, 0, 0), write=data,
                        check=check)

    def expect_term(self):
        """Read until a C2HTermReq arrives; return (fes, fei); then expect EOF."""
        p = self.recv_pdu()
        assert p["type"] == C2H_TERM, "expected C2HTermReq, got type %d" % p["type"]
        assert p["hlen"] == 24 and 24 <= p["plen"] <= 152
        fes, fei = struct.unpack("<HI", p["raw"][8:14])
        return fes, fei

    def expect_eof(self):
        try:
            while True:
                if not self.s.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True


def admin_session(addr, port, subnqn, kato=0, **kw):
    c = Conn(addr, port, **kw)
    c.icreq()
    cqe = c.connect(subnqn, kato=kato)
    c.cntlid = cqe["dw0"] & 0xFFFF
    c.enable()
    return c


def io_session(addr, port, subnqn, cntlid, qid=1, sqsize=127, **kw):
    c = Conn(addr, port, **kw)
    c.icreq()
    c.connect(subnqn, qid=qid, sqsize=sqsize, cntlid=cntlid)
    return c
