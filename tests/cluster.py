"""A test cluster of real nodes on one machine: Linux network namespaces behind a bridge, each with
its own IP on ``eth0``, its own process table (PID namespace) and an sshd reachable with a test-only
key; the filesystem is shared, like nodes on NFS (recipe: ``docs/cluster.md``).

    python tests/cluster.py up [--nodes 2]     # prints the node addresses and the env to use
    python tests/cluster.py down TAG           # tears down what `up` made (TAG as printed)

Needs root, ``ip netns``, ``unshare``, ``sshd`` and ``pdsh`` (CI installs ``openssh-server pdsh
rsync``). Names and the subnet derive from a random tag checked against what exists, so two runs
cannot share them; ``down`` removes only what this tag made: the nodes' processes (by PID, from
``ip netns pids``), the namespaces, the bridge and the temp folder. Traffic stays on the bridge.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = ("ip", "unshare", "ssh", "ssh-keygen", "pdsh")
SSHD = "/usr/sbin/sshd"
HOME_BINDS = (".pyenv", ".cache/torch_extensions")  # from this machine's home: its Python, DeepSpeed's op builds
RAY_TMP = "/tmp/ray"


def unavailable() -> str | None:
    """Why a cluster cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [t for t in TOOLS if not shutil.which(t)] + ([SSHD] if not os.path.exists(SSHD) else [])
    if missing:
        return f"missing {missing} (apt-get install openssh-server pdsh rsync)"
    probe = f"zprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode:
        return f"`ip netns add` refused: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*cmd: str, ns: str | None = None) -> str:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    r = subprocess.run(full, capture_output=True, text=True, timeout=60)
    if r.returncode:
        raise RuntimeError(f"{' '.join(full)} failed: {r.stderr.strip()}")
    return r.stdout


def reap_stale() -> None:
    """Tear down clusters this module made for a process that is gone (killed before its teardown):
    found by their own marker folder, so nothing anyone else made is touched."""
    for d in Path(tempfile.gettempdir()).glob("zoome-cluster-*"):
        try:
            pid, n = (int(x) for x in (d / "owner").read_text().split())
        except (OSError, ValueError):
            continue
        if 0 < pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            Cluster(n, d.name.rsplit("-", 1)[1]).down()


class Cluster:
    """``with Cluster(2) as c:`` → ``c.addrs``, ``c.env`` (PATH with the test ssh), ``c.kill_node(i)``."""

    def __init__(self, nodes: int = 2, tag: str | None = None) -> None:
        self.n = nodes
        self.tag = tag or self._free_tag()
        t = int(self.tag, 16)
        self.subnet = ipaddress.ip_network(f"10.{64 + (t >> 8) % 64}.{t % 256}.0/24")
        self.bridge = f"zb{self.tag}"
        self.ns = [f"zn{self.tag}-{i}" for i in range(nodes)]
        self.addrs = [str(self.subnet.network_address + 11 + i) for i in range(nodes)]
        self.dir = Path(tempfile.gettempdir()) / f"zoome-cluster-{self.tag}"
        self.sshd: list[subprocess.Popen | None] = [None] * nodes
        self.owner = os.getpid()  # -1: made by `cluster.py up`, torn down only by `down`

    @staticmethod
    def _free_tag() -> str:
        existing = _run("ip", "-o", "link") + _run("ip", "netns", "list") + _run("ip", "-4", "-o", "addr")
        for _ in range(100):
            tag = f"{random.randrange(16**4):04x}"
            t = int(tag, 16)
            if f"zb{tag}" not in existing and f"zn{tag}" not in existing \
                    and f"10.{64 + (t >> 8) % 64}.{t % 256}." not in existing:
                return tag
        raise RuntimeError("no free cluster tag")

    @property
    def env(self) -> dict[str, str]:
        """Environment for commands that reach the nodes: our ssh (test key, no host checks) first."""
        return {**os.environ, "PATH": f"{self.dir / 'bin'}:{os.environ['PATH']}"}

    def up(self) -> "Cluster":
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def _up(self) -> None:
        reap_stale()
        d = self.dir
        (d / "bin").mkdir(parents=True)
        (d / "owner").write_text(f"{self.owner} {self.n}")
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "id_ed25519"))
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "hostkey"))
        shutil.copy(d / "id_ed25519.pub", d / "authorized_keys")
        hosts = " ".join(self.addrs)
        (d / "ssh_config").write_text(
            f"Host {hosts}\n StrictHostKeyChecking no\n UserKnownHostsFile /dev/null\n LogLevel ERROR\n"
            f" IdentityFile {d / 'id_ed25519'}\n ConnectTimeout 10\n ServerAliveInterval 5\n ServerAliveCountMax 3\n")
        # ssh reads ~/.ssh/config of the passwd home, not $HOME: a wrapper first on PATH points every
        # ssh (ours, pdsh's, DeepSpeed's) at the test config without touching the machine's.
        (d / "bin" / "ssh").write_text(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {d / 'ssh_config'} \"$@\"\n")
        (d / "bin" / "ssh").chmod(0o755)
        gw = self.subnet.network_address + 1
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{gw}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i, (ns, addr) in enumerate(zip(self.ns, self.addrs)):
            host_end, node_end = f"zv{self.tag}{i}", f"zp{self.tag}{i}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end)
            _run("ip", "link", "set", node_end, "netns", ns)
            _run("ip", "link", "set", host_end, "master", self.bridge)
            _run("ip", "link", "set", host_end, "up")
            _run("ip", "link", "set", node_end, "name", "eth0", ns=ns)  # the same name on every node
            _run("ip", "addr", "add", f"{addr}/24", "dev", "eth0", ns=ns)
            _run("ip", "link", "set", "eth0", "up", ns=ns)
            _run("ip", "link", "set", "lo", "up", ns=ns)
            _run("ip", "route", "add", "default", "via", str(gw), ns=ns)
            self.start_node(i)

    def start_node(self, i: int) -> None:
        """(Re)start node ``i``: its sshd as PID 1 of a fresh PID namespace inside its network namespace."""
        d = self.dir
        sshd = [SSHD, "-D", "-e", "-o", f"ListenAddress={self.addrs[i]}",
                "-o", f"AuthorizedKeysFile={d / 'authorized_keys'}", "-o", "PermitRootLogin=prohibit-password",
                "-o", "StrictModes=no", "-o", "UsePAM=no", "-o", f"PidFile={d / f'sshd{i}.pid'}",
                "-h", str(d / "hostkey")]
        # A node of its own: its home (what `ray up` and setup commands write to ~) and its /tmp/ray (Ray's
        # sockets and session folders, which Ray expects no other node to share); the rest of the
        # filesystem stays shared. The interpreter under ~/.pyenv is bound into the home first, or every
        # venv's python would vanish inside the node. Mounts are private to the node's mount namespace.
        home, ray_tmp = d / f"node{i}" / "home", d / f"node{i}" / "tmp-ray"
        ray_tmp.mkdir(parents=True, exist_ok=True)
        Path(RAY_TMP).mkdir(exist_ok=True)  # the mount point (Ray's default temp dir)
        binds = []
        for sub in HOME_BINDS:
            if (Path.home() / sub).exists():
                (home / sub).mkdir(parents=True, exist_ok=True)
                binds.append(f"mount --bind {shlex.quote(str(Path.home() / sub))} {shlex.quote(str(home / sub))}")
        script = " && ".join([*binds, f"mount --rbind {shlex.quote(str(home))} {shlex.quote(str(Path.home()))}",
                              f"mount --bind {shlex.quote(str(ray_tmp))} {RAY_TMP}",
                              "exec " + shlex.join(sshd)])
        self.sshd[i] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[i], "unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script],
            stdout=subprocess.DEVNULL, stderr=open(d / f"sshd{i}.log", "ab"), start_new_session=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.ssh(i, "true", timeout=15).returncode == 0:
                return
            time.sleep(0.3)
        raise RuntimeError(f"node {i} ({self.addrs[i]}): sshd did not answer; {(d / f'sshd{i}.log').read_text()[-500:]}")

    def ssh(self, i: int, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", "-o", "BatchMode=yes", self.addrs[i], command], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def pids(self, i: int) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", self.ns[i]], capture_output=True, text=True)
        return [int(p) for p in r.stdout.split()]

    def kill_node(self, i: int) -> None:
        """The machine dies: SIGKILL every process of the node at once."""
        for pid in self.pids(i):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.sshd[i] is not None:
            self.sshd[i].wait(timeout=30)
            self.sshd[i] = None

    def down(self) -> None:
        for i, ns in enumerate(self.ns):
            if ns in _run("ip", "netns", "list"):
                self.kill_node(i)
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            os.rmdir(RAY_TMP)  # the mount point, if nothing else uses it
        except OSError:
            pass

    def __enter__(self) -> "Cluster":
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up")
    u.add_argument("--nodes", type=int, default=2)
    dn = sub.add_parser("down")
    dn.add_argument("tag")
    dn.add_argument("--nodes", type=int, default=2)
    a = p.parse_args(argv)
    if a.cmd == "up":
        why = unavailable()
        if why:
            print(f"cluster.py: {why}", file=sys.stderr)
            return 2
        c = Cluster(a.nodes)
        c.owner = -1  # outlives this process on purpose: never reaped as stale
        c.up()
        print(json.dumps({"tag": c.tag, "nodes": c.addrs, "PATH": c.env["PATH"].split(":")[0],
                          "down": f"python tests/cluster.py down {c.tag} --nodes {a.nodes}"}, indent=1))
        return 0
    Cluster(a.nodes, a.tag).down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
