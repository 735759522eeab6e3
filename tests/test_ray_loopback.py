"""The embedded Ray cluster (`batchinfer run` with no RAY_ADDRESS) listens on loopback only.

It is started in a subprocess: the session's own cluster (`ray_cluster`) lives in this
process, and a second `ray.init` here would clash with it. The child lists the listening
TCP sockets of its own cluster's processes (its descendants, by pid) from /proc.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, WORKER_ENV, stop_process_session

CHILD = r'''
import json, os, ray
from batchinfer import runner
from batchinfer.config_loader import config_from_dict

def children_of():
    kids = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    kids.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except OSError:
                pass
    return kids

def descendants(pid):
    kids, found, todo = children_of(), [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(kids.get(p, []))
    return found

def listening(pids):
    inodes = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = pid
        except OSError:
            pass
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    hexip, hexport = cols[1].split(":")
                    raw = bytes.fromhex(hexip)
                    ip = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host order words
                    pid = inodes[cols[9]]
                    with open(f"/proc/{pid}/comm") as c:
                        name = c.read().strip()
                    found.append({"ip": ".".join(map(str, ip)) if len(ip) == 4 else ip.hex(),
                                  "port": int(hexport, 16), "pid": pid, "name": name})
    return found

assert runner._connect_ray(config_from_dict({"run": {"num_workers": 1}}))
ray.get(ray.remote(lambda: 1).remote())  # a worker process, with its own gRPC server
print("LISTENERS " + json.dumps(listening(descendants(os.getpid()))), flush=True)
ray.shutdown()
'''


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip if "." in ip else bytes.fromhex(ip))
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or bool(mapped and mapped.is_loopback)


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("0" * 31 + "1")  # ::1
    assert is_loopback("00000000000000000000ffff7f000001")  # ::ffff:127.0.0.1
    assert not is_loopback("0.0.0.0") and not is_loopback("0" * 32) and not is_loopback("10.1.2.3")


@pytest.mark.slow
def test_embedded_cluster_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(WORKER_ENV)
    log = tmp_path / "child.log"
    proc = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=log.open("wb"), text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        stop_process_session(proc, grace=5)
    lines = [line for line in out.splitlines() if line.startswith("LISTENERS ")]
    assert proc.returncode == 0 and lines, f"child failed ({proc.returncode}):\n{log.read_text()[-3000:]}"
    listeners = json.loads(lines[0].removeprefix("LISTENERS "))
    names = {entry["name"] for entry in listeners}
    assert {"gcs_server", "raylet"} <= names, f"expected the GCS and raylet among {listeners}"
    exposed = [entry for entry in listeners if not is_loopback(entry["ip"])]
    assert not exposed, f"listening beyond loopback (expected 127.0.0.1 only): {exposed}"
