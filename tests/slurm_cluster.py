"""A real SLURM cluster on one machine: ``slurmctld`` on a controller node and ``slurmd`` on compute
nodes, each node a network namespace with its own IP, PID namespace, hostname, ``/run`` (its own munge
socket) and ``/etc/hosts`` + ``/etc/slurm``; the rest of the filesystem is shared, like NFS (recipe:
``docs/cluster.md``, "SLURM").

    with SlurmCluster(2) as c:
        c.client("sbatch", "-N2", "job.sh")      # any SLURM client command, run on the controller node
        c.kill_node(1); c.start_node(1)          # a compute node dies, then comes back

Needs root, ``ip netns``, ``unshare``, ``nsenter`` and Debian's ``slurm-wlm`` and ``munge`` (``.ci/run``
installs them). ``c.node_local`` is a folder each compute node has its own copy of (bind-mounted inside
the node's mount namespace), at the same path: storage that is not shared, as on cloud nodes. Names and the subnet derive from a random tag; ``down``
removes only what this tag made. No cgroups are used (``proctrack/linuxproc``, ``task/none``).
"""
from __future__ import annotations

import ipaddress
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

RAY_TMP = "/tmp/ray"
TOOLS = ("ip", "unshare", "nsenter", "slurmctld", "slurmd", "munged", "srun", "sbatch", "scontrol")
# PID 1 of a node: starts its daemons and reaps every orphan until it is killed.
INIT = """
import os, subprocess, sys, time
procs = [subprocess.Popen(c, shell=True) for c in sys.argv[1:]]
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(1)
"""


def unavailable() -> str | None:
    """Why a SLURM cluster cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [t for t in TOOLS if not shutil.which(t) and not Path("/usr/sbin", t).exists()]
    if missing:
        return f"missing {missing} (apt-get install slurm-wlm munge)"
    return None


def _run(*cmd: str) -> str:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r.stdout


def _which(tool: str) -> str:
    return shutil.which(tool) or f"/usr/sbin/{tool}"


class SlurmCluster:
    """``ctl`` (slurmctld) and compute nodes ``n1..nN`` (slurmd) on one bridge."""

    def __init__(self, nodes: int = 2, cpus: int = 2) -> None:
        self.n, self.cpus = nodes, cpus
        self.tag = self._free_tag()
        t = int(self.tag, 16)
        self.subnet = ipaddress.ip_network(f"10.{128 + (t >> 8) % 64}.{t % 256}.0/24")
        self.bridge = f"sb{self.tag}"
        self.names = ["ctl"] + [f"n{i}" for i in range(1, nodes + 1)]
        self.ns = [f"sn{self.tag}-{name}" for name in self.names]
        self.addrs = [str(self.subnet.network_address + 10 + i) for i in range(len(self.names))]
        self.dir = Path(tempfile.mkdtemp(prefix=f"zoome-slurm-{self.tag}-"))
        self.init: list[subprocess.Popen | None] = [None] * len(self.names)
        self.node_local = self.dir / "node-local"

    @staticmethod
    def _free_tag() -> str:
        existing = _run("ip", "-o", "link") + _run("ip", "netns", "list") + _run("ip", "-4", "-o", "addr")
        for _ in range(100):
            tag = f"{random.randrange(16**4):04x}"
            t = int(tag, 16)
            if f"sb{tag}" not in existing and f"sn{tag}" not in existing \
                    and f"10.{128 + (t >> 8) % 64}.{t % 256}." not in existing:
                return tag
        raise RuntimeError("no free cluster tag")

    def local_dir(self, node: int) -> Path:
        """Where node ``node``'s own folders live on the host (node 1 = n1); ``own`` is its ``node_local``."""
        return self.dir / "local" / self.names[node]

    def up(self, attempts: int = 3) -> "SlurmCluster":
        """Start the cluster. Seen here about one start in five: every munged logs "Unauthorized
        credential for client UID=0" and no node ever registers; a fresh start does not repeat it,
        so a start whose nodes are not idle within 20 s is torn down and made again."""
        for attempt in range(attempts):
            try:
                self._up()
                return self
            except BaseException as e:
                self.down()
                if attempt == attempts - 1 or not isinstance(e, RuntimeError) or "not idle" not in str(e):
                    raise
                print(f"slurm_cluster: start {attempt + 1} failed ({str(e).splitlines()[0]}); again", file=sys.stderr)
                self.__init__(self.n, self.cpus)
        return self

    def _up(self) -> None:
        d = self.dir
        for sub in ("conf", "state", "spool", "log", "run"):
            (d / sub).mkdir()
        with open(d / "munge.key", "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(d / "munge.key", 0o400)
        (d / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
            f"{a} {n}\n" for a, n in zip(self.addrs, self.names)))
        nodes = "".join(f"NodeName={n} NodeAddr={a} CPUs={self.cpus} RealMemory=4000 State=UNKNOWN\n"
                        for n, a in zip(self.names[1:], self.addrs[1:]))
        (d / "conf" / "slurm.conf").write_text(f"""ClusterName=zt{self.tag}
SlurmctldHost=ctl({self.addrs[0]})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
SlurmdTimeout=10
KillWait=5
MinJobAge=600
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
{nodes}PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        (d / "conf" / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
        Path("/etc/slurm").mkdir(exist_ok=True)  # the mount point (the package's own folder)
        gw = self.subnet.network_address + 1
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{gw}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i, (ns, addr) in enumerate(zip(self.ns, self.addrs)):
            host_end, node_end = f"sv{self.tag}{i}", f"sp{self.tag}{i}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end)
            _run("ip", "link", "set", node_end, "netns", ns)
            _run("ip", "link", "set", host_end, "master", self.bridge)
            _run("ip", "link", "set", host_end, "up")
            for cmd in (("link", "set", node_end, "name", "eth0"), ("addr", "add", f"{addr}/24", "dev", "eth0"),
                        ("link", "set", "eth0", "up"), ("link", "set", "lo", "up"),
                        ("route", "add", "default", "via", str(gw))):
                _run("ip", "netns", "exec", ns, "ip", *cmd)
            self.start_node(i)
        self.wait_idle(20)

    def start_node(self, i: int) -> None:
        """(Re)start node ``i`` (0: the controller): a fresh PID namespace whose init mounts the node's
        own /run, hosts, slurm conf and node-local folders, then runs munged and its SLURM daemon."""
        d, name = self.dir, self.names[i]
        # a restarted node keeps no slurmd state: stale step records of the job it ran before it died
        # would otherwise end that job's requeued run (same job and step ids)
        shutil.rmtree(d / "spool" / name, ignore_errors=True)
        mounts = ["mount --make-rprivate /", f"hostname {name}", "mount -t tmpfs tmpfs /run",
                  "mkdir -p /run/munge", f"mount --bind {d / 'hosts'} /etc/hosts", f"mount --bind {d / 'conf'} /etc/slurm"]
        if i > 0:  # a node's own /tmp/ray (Ray's sockets and sessions) and node-local folder
            (self.local_dir(i) / "tmp-ray").mkdir(parents=True, exist_ok=True)
            Path(RAY_TMP).mkdir(exist_ok=True)  # the mount point
            mounts.append(f"mount --bind {self.local_dir(i) / 'tmp-ray'} {RAY_TMP}")
            (self.local_dir(i) / "own").mkdir(exist_ok=True)
            self.node_local.mkdir(exist_ok=True)
            mounts.append(f"mount --bind {self.local_dir(i) / 'own'} {self.node_local}")
        munge = (f"{_which('munged')} -F --force --key-file={d / 'munge.key'} --socket=/run/munge/munge.socket.2 "
                 f"--pid-file=/run/munge/munged.pid --seed-file=/run/munge/seed --log-file={d / 'log' / f'munge-{name}.log'}")
        daemon = f"{_which('slurmctld')} -D -i" if i == 0 else f"{_which('slurmd')} -D -N {name}"
        script = " && ".join(mounts) + " && exec " + shlex.join(
            [sys.executable, "-c", INIT, munge, f"sleep 1; exec {daemon} >> {d / 'log' / f'{name}.out'} 2>&1"])
        self.init[i] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[i], "unshare", "--pid", "--fork", "--mount-proc", "--mount", "--uts",
             "sh", "-c", script], stdout=subprocess.DEVNULL, stderr=open(d / "log" / f"init-{name}.log", "ab"),
            start_new_session=True)

    def pid1(self, i: int) -> int:
        """The host PID of node ``i``'s init (to ``nsenter`` it)."""
        deadline = time.time() + 10
        while time.time() < deadline:
            for pid in self.pids(i):
                try:
                    if Path(f"/proc/{pid}/status").read_text().split("NSpid:")[1].split()[-1] == "1":
                        return pid
                except (OSError, IndexError):
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"node {self.names[i]} has no init")

    def pids(self, i: int) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", self.ns[i]], capture_output=True, text=True)
        return [int(p) for p in r.stdout.split()]

    def client(self, *cmd: str, node: int = 0, timeout: float = 60, env: dict | None = None,
               check: bool = True, cwd: Path | str | None = None) -> subprocess.CompletedProcess:
        """A command inside node ``node`` (default: the controller), from ``cwd`` (default: the current folder)."""
        full = ["nsenter", "-t", str(self.pid1(node)), "-a", "sh", "-c",
                f"cd {shlex.quote(str(cwd or os.getcwd()))} && exec {shlex.join(cmd)}"]
        r = subprocess.run(full, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
        if check and r.returncode:
            raise RuntimeError(f"{shlex.join(cmd)} failed ({r.returncode}): {r.stdout[-2000:]} {r.stderr[-2000:]}")
        return r

    def wait_idle(self, timeout: float = 60) -> None:
        """Until every compute node is idle (schedulable)."""
        deadline, out = time.time() + timeout, ""
        while time.time() < deadline:
            try:
                out = self.client("sinfo", "-h", "-N", "-o", "%N %t", timeout=15, check=False).stdout
            except (RuntimeError, subprocess.TimeoutExpired):
                out = ""
            states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
            if all(states.get(n) in ("idle", "mix", "alloc") for n in self.names[1:]):
                return
            time.sleep(0.3)
        logs = "\n".join(f"{p.name}: {p.read_text()[-600:]}" for p in sorted((self.dir / "log").glob("*")))
        raise RuntimeError(f"SLURM nodes not idle after {timeout}s: {out!r}\n{logs}")

    def wait_job(self, job: str, timeout: float = 600) -> str:
        """Until job ``job`` (all of an array's tasks) has left the queue; returns its final state(s)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.client("squeue", "-h", "-j", job, timeout=15, check=False).stdout.strip():
                r = self.client("scontrol", "show", "job", job, timeout=15, check=False)
                return " ".join(w.split("=", 1)[1] for w in r.stdout.split() if w.startswith("JobState="))
            time.sleep(1)
        raise TimeoutError(f"SLURM job {job} still queued or running after {timeout}s")

    def log_tail(self, chars: int = 3000) -> str:
        """The end of slurmctld's log (for a failing test's message)."""
        try:
            return "\nslurmctld.log:\n" + (self.dir / "log" / "slurmctld.log").read_text()[-chars:]
        except OSError:
            return ""

    def kill_node(self, i: int) -> None:
        """The machine dies: SIGKILL every process of the node at once."""
        for pid in self.pids(i):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.init[i] is not None:
            self.init[i].wait(timeout=30)
            self.init[i] = None

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

    def __enter__(self) -> "SlurmCluster":
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()
