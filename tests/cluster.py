"""A real one-node SLURM cluster and a PostgreSQL-backed MLflow server, on this machine, for tests.

Debian's packages (slurm-wlm, munge, postgresql) are installed when they are missing and we are
root; otherwise :func:`missing` says why the tests that need them skip. SLURM's state and logs
live in a scratch directory, its configuration in /etc/slurm (where commands inside a job look),
PostgreSQL's data in a directory the postgres user can enter. Daemons are started in the order
SLURM needs (munged, slurmctld, slurmd) and stopped again by :meth:`Services.stop`.

The node has the machine's real CPU count and two fake GPUs (empty files as gres devices), a
``cpu`` partition (default) and a ``gpu`` partition. Without cgroups, memory is enforced by
polling: ``jobacct_gather/linux`` with ``OverMemoryKill`` kills a job above its ``--mem``.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge", "postgresql")
# Commands started inside a job (srun) find the configuration only where a cluster keeps it
ETC = Path("/etc/slurm")
MARK = "# cellatlas test cluster\n"
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged")
SLURMCTLD_PORT = 6817
SLURMD_PORT = 6818
FAKE_GPUS = 2
PG_USER = "postgres"
AS_PG = ["runuser", "-u", PG_USER, "--"]  # initdb refuses root; missing() asks for root


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _have_all() -> bool:
    return all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES) and _pg_bin() is not None


def missing() -> str | None:
    """None when SLURM and PostgreSQL are here (installing them if we can), else why not."""
    if os.geteuid() != 0:
        return "starting a SLURM cluster (slurmd, /etc/slurm) and PostgreSQL needs root"
    if _have_all():
        return None
    if not shutil.which("apt-get"):
        return "SLURM/PostgreSQL are not installed and there is no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
        if r.returncode != 0:
            return f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    return None if _have_all() else "packages installed but SLURM/PostgreSQL binaries not found"


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}")


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what: str, timeout: float = 60, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s\n{tail}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _terminate(pid: int, grace: float = 15) -> None:
    """SIGTERM, then SIGKILL if the process is still there after ``grace`` seconds."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def slurm_conf(root: Path, cpus: int, memory_mb: int) -> str:
    return MARK + f"""\
ClusterName=cellatlas-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort={SLURMCTLD_PORT}
SlurmdPort={SLURMD_PORT}
# no cgroups here: the cgroup defaults fail to launch job steps
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
# memory is enforced by polling each second: a job above its --mem is killed (OUT_OF_MEMORY)
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
# finished jobs stay visible to squeue/scontrol (there is no accounting database to ask)
MinJobAge=3600
ReturnToService=2
SchedulerType=sched/backfill
MpiDefault=none
GresTypes=gpu
NodeName=localhost CPUs={cpus} RealMemory={memory_mb} Gres=gpu:{FAKE_GPUS} State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP
"""


@dataclass
class Services:
    root: Path
    tracking_uri: str = ""
    #: what the jobs' environment carries to authenticate (never the config)
    credentials: dict[str, str] = field(default_factory=lambda: {
        "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(18)})
    _procs: list[subprocess.Popen] = field(default_factory=list)
    _pids: list[Path] = field(default_factory=list)
    _pg_root: Path | None = None
    _etc: list[Path] = field(default_factory=list)
    _slurm_started: bool = False

    # -- SLURM --------------------------------------------------------------------------------
    def start_slurm(self, memory_mb: int = 16000) -> None:
        if _port_open(SLURMCTLD_PORT):
            raise RuntimeError(f"port {SLURMCTLD_PORT} is taken: another slurmctld is running")
        # a node that reports less memory than configured is drained
        total_mb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                            if line.startswith("MemTotal")).split()[1]) // 1024
        memory_mb = min(memory_mb, total_mb - 1024)
        root = self.root / "slurm"
        for d in ("state", "spool"):
            (root / d).mkdir(parents=True, exist_ok=True)
        devices = [root / f"fakegpu{i}" for i in range(FAKE_GPUS)]
        for d in devices:
            d.touch()
        conf = ETC / "slurm.conf"
        if conf.exists() and not conf.read_text().startswith(MARK):
            raise RuntimeError(f"{conf} belongs to another cluster; not touching it")
        ETC.mkdir(parents=True, exist_ok=True)
        self._etc = [conf, ETC / "gres.conf"]
        conf.write_text(slurm_conf(root, os.cpu_count() or 1, memory_mb))
        (ETC / "gres.conf").write_text(
            MARK + "".join(f"NodeName=localhost Name=gpu File={d}\n" for d in devices))
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True, check=False).returncode != 0:
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            _run([_sbin("munged"), "--force"])
            self._pids.append(Path("/run/munge/munged.pid"))
        _run([_sbin("slurmctld"), "-f", str(conf)])
        self._slurm_started = True
        self._pids.append(root / "slurmctld.pid")
        _wait(lambda: _port_open(SLURMCTLD_PORT), "slurmctld", log=root / "slurmctld.log")
        _run([_sbin("slurmd"), "-f", str(conf), "-N", "localhost"])
        self._pids.append(root / "slurmd.pid")

        def idle():
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, check=False)
            return r.returncode == 0 and r.stdout.strip().startswith("idle")

        _wait(idle, "the SLURM node", log=root / "slurmd.log")

    # -- PostgreSQL + MLflow server -----------------------------------------------------------
    def start_tracking_server(self) -> str:
        pg_bin = _pg_bin()
        # the server runs as postgres, which cannot enter root's private scratch directories
        pg_root = Path(tempfile.mkdtemp(prefix="cellatlas-pg-"))
        self._pg_root = pg_root
        data, sock = pg_root / "data", pg_root / "sock"
        data.mkdir()
        sock.mkdir()
        for d in (pg_root, data, sock):
            shutil.chown(d, PG_USER, PG_USER)
        pg_port = _free_port()
        _run([*AS_PG, str(pg_bin / "initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust"])
        _run([*AS_PG, str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(pg_root / "server.log"),
              "-o", f"-p {pg_port} -k {sock} -c listen_addresses=127.0.0.1", "-w", "start"])
        _run([*AS_PG, str(pg_bin / "createdb"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", PG_USER, "mlflow"])
        port = _free_port()
        artifacts = self.root / "mlflow-artifacts"
        artifacts.mkdir()
        log = (self.root / "mlflow-server.log").open("w")
        # the README's recipe: cellatlas-server (MLflow's basic-auth app) on PostgreSQL; jobs
        # authenticate with the credentials in their environment (self.credentials)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = self.credentials["MLFLOW_TRACKING_PASSWORD"]
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "cellatlas-server"), "--dir", str(self.root / "mlflow-server"),
             "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"postgresql://{PG_USER}@127.0.0.1:{pg_port}/mlflow",
             "--artifacts-destination", artifacts.as_uri()],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
        self._procs.append(proc)
        self.tracking_uri = f"http://127.0.0.1:{port}"
        # ready is answering the API with credentials, not an open port: on a busy host the first
        # requests of a fresh server took longer than the pipeline's own check waits
        _wait(lambda: self._answers() or proc.poll() is not None, "mlflow server", timeout=300,
              log=self.root / "mlflow-server.log")
        if proc.poll() is not None:
            raise RuntimeError("mlflow server exited:\n" + (self.root / "mlflow-server.log").read_text()[-3000:])
        return self.tracking_uri

    def _answers(self) -> bool:
        """The pipeline's own first check passes with the credentials the jobs get."""
        from unittest import mock

        from cellatlas.errors import TrackingError
        from cellatlas.tracking import check_server

        try:
            with mock.patch.dict(os.environ, self.credentials):
                check_server(self.tracking_uri, attempts=1, timeout=30)
        except TrackingError:
            return False
        return True

    # -- teardown -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop what this instance started, each step on its own (one failure skips nothing)."""
        steps = [self._stop_server, self._stop_postgres, self._stop_slurm, self._remove_config]
        for step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 - teardown goes on; the error is shown
                print(f"cluster teardown: {step.__name__}: {e}", file=sys.stderr)

    def _stop_server(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _stop_postgres(self) -> None:
        if self._pg_root is not None:
            subprocess.run([*AS_PG, str(_pg_bin() / "pg_ctl"), "-D", str(self._pg_root / "data"), "-m", "fast",
                            "stop"], capture_output=True, check=False)
            shutil.rmtree(self._pg_root, ignore_errors=True)

    def _stop_slurm(self) -> None:
        if not self._slurm_started:  # never touch a cluster this instance did not start
            return
        subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True, check=False)
        for pid_file in reversed(self._pids):  # slurmd, slurmctld, then munged
            try:
                _terminate(int(pid_file.read_text().split()[0]))
            except (OSError, ValueError):
                pass
        time.sleep(1)

    def _remove_config(self) -> None:
        for f in self._etc:
            if f.exists() and f.read_text().startswith(MARK):
                f.unlink()
