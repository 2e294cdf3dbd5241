"""Whether the process behind a RUNNING run still exists, and what to do when it does not.

A run that ends normally, fails or gets SIGTERM closes itself (:func:`cellatlas.tracking.stage_run`).
What cannot close itself: a job killed with SIGKILL (SLURM's memory and time limits), a Snakemake
process killed the same way, a run whose server went away before it could be closed. So every
run records who runs it (host, pid and the pid's start time, which tells a reused pid apart; the
SLURM job id under SLURM), and:

* every invocation, when it starts, marks KILLED the runs of its experiment whose process is
  gone (:func:`reap`), with a note saying why; when it ends, likewise its own children;
* a job watches the Snakemake process that started it (:func:`watch_invocation`): when that
  process is gone the job stops itself (SIGTERM, so its run ends KILLED and it writes no output)
  instead of writing outputs that the next invocation writes too.

A run on another host without a SLURM job id cannot be checked from here and is left as it is.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from cellatlas.naming import TAG_HOST, TAG_NOTES, TAG_PID, TAG_PID_START, TAG_SLURM, TAG_STATUS

log = logging.getLogger(__name__)

#: the Snakemake process of the invocation, exported to its jobs by the parent run's process
ENV_SNAKEMAKE_PID = "CELLATLAS_SNAKEMAKE_PID"
ENV_SNAKEMAKE_START = "CELLATLAS_SNAKEMAKE_START"
ENV_SNAKEMAKE_HOST = "CELLATLAS_SNAKEMAKE_HOST"

ALIVE, GONE, UNKNOWN = "alive", "gone", "unknown"
#: squeue states of a job that will not run again (anything else is queued or running)
_SLURM_ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return ""


def start_time(pid: int) -> str | None:
    """When process ``pid`` started, as a stamp that only that process has; None if there is no such process.

    Linux: the boot's id and the seconds from boot to the process's start (``/proc/<pid>/stat``),
    which no clock change moves. psutil's epoch time is boot time + those seconds, and the boot
    time moves with the system clock (NTP, a virtual machine's clock stepped on resume): a job
    watching its Snakemake process took a one-second step for the process's end and stopped
    itself. Elsewhere: psutil's epoch time.
    """
    import psutil

    try:
        process = psutil.Process(pid)
        # a killed process its parent has not reaped yet is gone all the same
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        boot = _boot_id()
        if boot:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            return f"{boot}+{int(fields[19]) / os.sysconf('SC_CLK_TCK'):.2f}"  # field 22: starttime
        return f"{process.create_time():.2f}"
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, OSError, IndexError):
        return None


def _same_start(now: str, recorded: str) -> bool:
    """Whether two stamps of :func:`start_time` name one process (within a second: older versions
    recorded psutil's epoch time with two decimals, which still compares on their hosts)."""
    (boot, _, secs), (rec_boot, _, rec_secs) = now.rpartition("+"), recorded.rpartition("+")
    if not rec_boot and boot:  # an epoch time recorded by an older version
        import psutil

        boot, secs = "", str(float(secs) + psutil.boot_time())
    try:
        return boot == rec_boot and abs(float(secs) - float(rec_secs)) < 1.0
    except ValueError:
        return False


def identity(pid: int | None = None) -> dict[str, str]:
    """The tags that tell later whether this process is still there."""
    pid = pid or os.getpid()
    tags = {TAG_HOST: socket.gethostname(), TAG_PID: str(pid), TAG_PID_START: start_time(pid) or "0"}
    if "SLURM_JOB_ID" in os.environ:
        tags[TAG_SLURM] = os.environ["SLURM_JOB_ID"]
    return tags


def process_state(host: str, pid: str | int, started: str | float) -> str:
    """ALIVE or GONE for a process of this host, UNKNOWN for another host's."""
    if host != socket.gethostname():
        return UNKNOWN
    now = start_time(int(pid))
    # the same pid with another start time is another process: the recorded one is gone
    return ALIVE if now is not None and _same_start(now, str(started)) else GONE


def slurm_state(job_id: str) -> str:
    """ALIVE while SLURM still runs (or queues) ``job_id``, GONE once it ended, UNKNOWN without squeue."""
    if shutil.which("squeue") is None:
        return UNKNOWN
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    states = out.stdout.split()
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        return UNKNOWN
    return ALIVE if any(s not in _SLURM_ENDED for s in states) else GONE


def run_state(tags: Mapping[str, str]) -> tuple[str, str]:
    """(ALIVE | GONE | UNKNOWN, who: the process or job the run's tags name)."""
    if tags.get(TAG_SLURM):
        state = slurm_state(tags[TAG_SLURM])
        if state != UNKNOWN:
            return state, f"SLURM job {tags[TAG_SLURM]}"
    if tags.get(TAG_HOST) and tags.get(TAG_PID):
        who = f"process {tags[TAG_PID]} on {tags[TAG_HOST]}"
        return process_state(tags[TAG_HOST], tags[TAG_PID], tags.get(TAG_PID_START, "0")), who
    return UNKNOWN, "a process that recorded no host and pid"


def close_killed(client, run_id: str, why: str) -> None:
    client.set_tag(run_id, TAG_STATUS, "killed")
    client.set_tag(run_id, TAG_NOTES, why[:4900])
    client.set_terminated(run_id, status="KILLED")


def reap(client, experiment_id: str, *, by: str, parent: str | None = None) -> dict[str, list[str]]:
    """Mark KILLED every RUNNING run of the experiment (only ``parent``'s children if given) whose
    process or SLURM job is gone. A job still running in SLURM whose invocation is gone is
    cancelled first: it would write outputs the new invocation writes too.

    Returns ``{"killed": [run names], "unknown": [run names]}`` (unknown: another host's, left).
    """
    flt = "attributes.status = 'RUNNING'"
    if parent:
        flt += f" and tags.`mlflow.parentRunId` = '{parent}'"
    running = client.search_runs([experiment_id], filter_string=flt, max_results=5000)
    states = {r.info.run_id: run_state(r.data.tags) for r in running}
    found: dict[str, list[str]] = {"killed": [], "unknown": []}
    for run in running:
        state, who = states[run.info.run_id]
        orphan_of = run.data.tags.get("mlflow.parentRunId")
        if state == ALIVE and orphan_of in states and states[orphan_of][0] == GONE and run.data.tags.get(TAG_SLURM):
            subprocess.run(["scancel", run.data.tags[TAG_SLURM]], capture_output=True, timeout=20)
            state, who = GONE, f"SLURM job {run.data.tags[TAG_SLURM]} (cancelled: its Snakemake process is gone)"
        if state == GONE:
            try:
                close_killed(client, run.info.run_id, f"marked KILLED by {by}: {who} ended without closing this "
                                                      "run (killed, e.g. by SIGKILL or a job limit, or its server was lost)")
            except Exception as e:  # another user's run on a shared server: theirs to close
                log.warning("could not mark run %s KILLED: %s", run.info.run_id, " ".join(str(e).split())[:200])
                found["unknown"].append(run.info.run_name)
                continue
            found["killed"].append(run.info.run_name)
        elif state == UNKNOWN:
            found["unknown"].append(run.info.run_name)
    return found


def export_invocation() -> None:
    """Tell this process's jobs which Snakemake process to watch (see :func:`watch_invocation`)."""
    os.environ.update({ENV_SNAKEMAKE_PID: str(os.getpid()), ENV_SNAKEMAKE_HOST: socket.gethostname(),
                       ENV_SNAKEMAKE_START: start_time(os.getpid()) or "0"})


def watch_invocation(on_gone: Callable[[str], None], *, every: float = 2.0) -> threading.Thread | None:
    """Watch the invocation's Snakemake process from a daemon thread; once it is gone call
    ``on_gone(why)`` and stop this process with SIGTERM. None where there is nothing to watch
    (no invocation, or it runs on another host: a cluster job, which the next invocation
    cancels through SLURM instead)."""
    pid, host = os.environ.get(ENV_SNAKEMAKE_PID), os.environ.get(ENV_SNAKEMAKE_HOST)
    started = os.environ.get(ENV_SNAKEMAKE_START, "0")
    if not pid or host != socket.gethostname() or started == "0":  # "0": its start could not be read
        return None

    def loop() -> None:
        while process_state(host, pid, started) == ALIVE:
            time.sleep(every)
        why = f"its Snakemake process {pid} on {host} is gone; stopped so that it writes no output a new invocation writes"
        log.error("%s", why)
        try:
            on_gone(why)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=loop, name="cellatlas-watch-invocation", daemon=True)
    thread.start()
    return thread
