"""Process-wide memory protections for a process that holds secrets.

Three layers, set up once when `serve` starts:

1. Freed memory is wiped. The interpreter is restarted with pymalloc off
   (`PYTHONMALLOC=malloc`, so every Python object lives in glibc's heap) and
   with glibc told to overwrite every freed block (`glibc.malloc.perturb`) and
   to skip its per-thread cache (`glibc.malloc.tcache_count=0`), whose blocks
   are handed back unwiped. A temporary `str` or `bytes` that held part of a
   secret (a JSON body, a base64 value, a decoded key) is therefore
   overwritten the moment it is freed, in our code, in the TLS library and in
   gRPC alike.
2. Memory is locked. `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)` keeps
   every page the process touches, now or later, out of swap; ONFAULT locks
   pages as they are touched instead of faulting in whole thread stacks.
3. Nothing is dumped. The process is made non-dumpable (no core file, and no
   ptrace or /proc/PID/mem access without CAP_SYS_PTRACE), RLIMIT_CORE is 0,
   and coredump_filter excludes every mapping; secret buffers are also
   marked MADV_DONTDUMP where they are allocated.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import sys

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3

# The byte glibc writes over freed memory. Any non-zero value works; this one
# is easy to spot in a memory dump.
PERTURB_BYTE = 0xA5

WIPING_TUNABLES = f"glibc.malloc.tcache_count=0:glibc.malloc.perturb={PERTURB_BYTE}"

_all_locked = False


def all_locked() -> bool:
    """True once `lock_all_memory` has locked every page, present and future."""
    return _all_locked


class MemoryProtectionError(Exception):
    """Memory could not be protected as promised; the message says what to grant."""


def wiping_environment(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to restart under so freed memory is wiped; None if already so."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get("PYTHONMALLOC") == "malloc" and WIPING_TUNABLES in tunables:
        return None
    env = dict(environ)
    env["PYTHONMALLOC"] = "malloc"
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the driver writes nothing to disk, caches included
    env["GLIBC_TUNABLES"] = f"{tunables}:{WIPING_TUNABLES}" if tunables else WIPING_TUNABLES
    return env


def restart_with_wiping_allocator(argv: list[str]) -> None:
    """Re-execute this interpreter with `argv` unless freed memory is already wiped."""
    env = wiping_environment(dict(os.environ))
    if env is None:
        return
    os.execve(sys.executable, [sys.executable, *argv], env)  # noqa: S606 - same program


def lock_all_memory(allow_unlocked: bool) -> bool:
    """Lock every present and future page; True if locked.

    Without CAP_IPC_LOCK the kernel allows it only when the memlock limit
    covers the whole address space; failing that, start-up stops unless the
    operator accepted unlocked memory.
    """
    global _all_locked
    if _libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0:
        _all_locked = True
        return True
    err = ctypes.get_errno()
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft // 1024} KiB"
    message = (
        f"cannot lock memory ({os.strerror(err)}; memlock limit {limit}): grant "
        "the CAP_IPC_LOCK capability (in Kubernetes: securityContext.capabilities.add: "
        "[IPC_LOCK]) or raise the memlock limit to unlimited (ulimit -l unlimited)"
    )
    if not allow_unlocked:
        raise MemoryProtectionError(message)
    log.warning(
        "%s; continuing with unlocked memory because --allow-unlocked-memory was "
        "given: secrets may be written to swap",
        message,
    )
    return False


def forbid_dumps() -> None:
    """No core dumps, no ptrace by peers, no mapping in any dump."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise MemoryProtectionError(f"prctl(PR_SET_DUMPABLE): {os.strerror(ctypes.get_errno())}")
    with open("/proc/self/coredump_filter", "w") as f:
        f.write("0")


def is_dumpable() -> bool:
    return bool(_libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
