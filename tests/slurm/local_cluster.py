"""A real one-node SLURM cluster on localhost with a private configuration, for the tests.

Everything lives in one temporary folder: ``slurm.conf`` (found through ``SLURM_CONF``, never
/etc/slurm), the controller's state, the node's spool, pid and log files, and munge's key,
socket (``AuthInfo=socket=...``), pid, seed and log. The daemons are started in the foreground
as children of this process (munged as user munge), so that they are stopped by their own PIDs.
Debian's ``munge slurmctld slurmd slurm-client`` are installed with apt-get when missing (root).
What mattered on this kind of machine (../shared/notes/environment.md): no systemd and no cgroups
(``proctrack/linuxproc``, ``task/none``), no accounting database, the node named ``hostname -s``
at 127.0.0.1, munge's key owned by munge with mode 0400 in a folder every user can traverse.
``JobRequeue=1`` lets batch jobs be requeued, and ``cred_expire`` is short because SLURM holds a
requeued job back for that long (default 120 s) before it may start again.

Also a command-line tool for trying the launch scripts by hand::

    python tests/slurm/local_cluster.py start DIR   # prints the export SLURM_CONF=... line
    python tests/slurm/local_cluster.py stop DIR
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
COMMANDS = {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client"}
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
# The test group's switch (tests/slurm/conftest.py): without it the tests skip with this reason.
SLURM_TESTS = os.environ.get("SSL_VIT_SLURM_TESTS", "") == "1"
SKIP_REASON = ("SLURM test: set SSL_VIT_SLURM_TESTS=1 to run it on a local one-node SLURM cluster (as root; "
               "installs Debian's munge, slurmctld, slurmd and slurm-client when missing)")
CRED_EXPIRE_S = 10  # a requeued job may start again after this many seconds
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}

SLURM_CONF = """\
# Written by tests/slurm/local_cluster.py: a one-node cluster on localhost, private to {root}.
ClusterName=sslvittest
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={cred_expire}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Look at pending jobs every 2 s (default 60 s, backfill 30 s): a requeued or dependent job starts soon.
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=600
JobRequeue=1
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class ClusterError(RuntimeError):
    """The cluster could not be started; the message has the daemons' last log lines."""


def _which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def ensure_packages() -> None:
    """Install Debian's munge and SLURM daemons and clients where a command is missing."""
    missing = sorted({pkg for cmd, pkg in COMMANDS.items() if _which(cmd) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise ClusterError(f"missing {', '.join(missing)} and not root: run as root (apt-get install -y "
                           f"{' '.join(PACKAGES)})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode:
            raise ClusterError(f"{' '.join(cmd)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-2000:]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    with open("/proc/meminfo") as file:
        total_kb = int(re.search(r"MemTotal:\s+(\d+)", file.read()).group(1))
    return max(512, total_kb // 1024 // 2)  # below what slurmd finds, or the node is drained


class LocalSlurm:
    """The cluster in ``root`` (module docstring). ``start()``, then ``env`` for the clients."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="ssl_vit_slurm_"))
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment for sbatch, srun, scontrol, ... (and the jobs, which inherit it)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- start / stop ----------------------------------------------------------------------
    def start(self, timeout: float = 90) -> "LocalSlurm":
        if os.geteuid() != 0:
            raise ClusterError("the local SLURM cluster needs root (slurmd starts jobs, munged runs as user munge)")
        ensure_packages()
        try:
            self._start_munge()
            self._write_conf()
            for name in ("slurmctld", "slurmd"):
                (self.root / "log").mkdir(exist_ok=True)
                self.procs[name] = subprocess.Popen([_which(name), "-D"], env=self.env, stdin=subprocess.DEVNULL,
                                                    stdout=open(self.root / "log" / f"{name}.out", "ab"),
                                                    stderr=subprocess.STDOUT, start_new_session=True)
                if name == "slurmctld":
                    self._wait(lambda: self._run("scontrol", "ping").returncode == 0, 30, "slurmctld to answer")
            self._wait(lambda: self.node_state() == "idle", timeout, "the node to become idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        import pwd

        munge_dir = self.root / "munge"
        munge_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # munged (user munge) must traverse to its socket
        try:
            user = pwd.getpwnam("munge")
        except KeyError as error:
            raise ClusterError("no user munge: is Debian's munge package installed?") from error
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        for path in (munge_dir, key):
            os.chown(path, user.pw_uid, user.pw_gid)
        os.chmod(munge_dir, 0o755)
        os.chmod(key, 0o400)
        socket_path = munge_dir / "munge.socket"
        self.procs["munged"] = subprocess.Popen(
            [_which("munged"), "--foreground", f"--socket={socket_path}", f"--key-file={key}",
             f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
             f"--seed-file={munge_dir / 'munged.seed'}"],
            user=user.pw_uid, group=user.pw_gid, extra_groups=[], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=open(self.root / "munged.err", "ab"), start_new_session=True)

        def munge_works() -> bool:
            if self.procs["munged"].poll() is not None:
                raise ClusterError(f"munged exited with code {self.procs['munged'].returncode}")
            cred = subprocess.run([_which("munge") or "munge", "-n", "-S", str(socket_path)], capture_output=True)
            return cred.returncode == 0 and subprocess.run(
                [_which("unmunge") or "unmunge", "-S", str(socket_path)], input=cred.stdout,
                capture_output=True).returncode == 0

        self._wait(munge_works, 20, "munged to answer")

    def _write_conf(self) -> None:
        for sub in ("state", "spool", "run", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.conf.write_text(SLURM_CONF.format(root=self.root, node=self.node, ctld_port=_free_port(),
                                               slurmd_port=_free_port(), cred_expire=CRED_EXPIRE_S, cpus=cpus,
                                               memory_mb=_memory_mb()))

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited with code {proc.returncode} while waiting for {what}\n"
                                       + self.logs_tail())
            if ready():
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}\n" + self.logs_tail())
            time.sleep(0.3)

    def logs_tail(self, lines: int = 15) -> str:
        out = []
        for path in sorted(self.root.rglob("*.log")) + sorted(self.root.rglob("*.out")) + sorted(self.root.rglob("*.err")):
            if path.parent.name == "jobs":
                continue
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel what is left of the jobs, then end slurmd, slurmctld and munged by PID."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            jobs = self._run("squeue", "-h", "-o", "%A").stdout.split()
            if jobs:
                self._run("scancel", *jobs)
                deadline = time.monotonic() + 20
                while self._run("squeue", "-h", "-o", "%A").stdout.split() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    # -- clients -----------------------------------------------------------------------------
    def _run(self, *cmd: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=kwargs.pop("env", self.env), capture_output=True, text=True,
                              timeout=timeout, **kwargs)

    def node_state(self) -> str:
        return self._run("sinfo", "-h", "-N", "-o", "%t").stdout.strip().rstrip("*~#$@+-")

    def sbatch(self, *args: str, cwd: str | os.PathLike, env: dict[str, str] | None = None) -> str:
        """Submit; returns the job id (``sbatch --parsable``)."""
        done = self._run("sbatch", "--parsable", *args, cwd=cwd, env={**self.env, **(env or {})})
        if done.returncode:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {done.stderr}")
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, Dependency, ...)."""
        done = self._run("scontrol", "-o", "show", "job", str(job_id))
        if done.returncode:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout))

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        """Wait for the job to reach a final state; returns its record."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.job(job_id)
            if record.get("JobState") in FINAL_STATES:
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {record.get('JobState')} after {timeout:.0f} s: {record}")
            time.sleep(0.5)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__.split("Also")[1].strip(), file=sys.stderr)
        return 2
    cluster = LocalSlurm(argv[1])
    if argv[0] == "start":
        Path(argv[1]).mkdir(parents=True, exist_ok=True)
        cluster.start()
        pids = {name: proc.pid for name, proc in cluster.procs.items()}
        (cluster.root / "pids").write_text(" ".join(f"{n}={p}" for n, p in pids.items()))
        print(f"export SLURM_CONF={cluster.conf}   # daemons: {pids}")
        os._exit(0)  # leave the daemons running (their Popen objects would otherwise be reaped)
    for item in (cluster.root / "pids").read_text().split():
        name, pid = item.split("=")
        try:
            os.kill(int(pid), signal.SIGTERM)
            print(f"stopped {name} (pid {pid})")
        except ProcessLookupError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
