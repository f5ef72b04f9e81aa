"""How the host's C allocator (glibc malloc) hands memory to XLA on CPU: `config.host_malloc`.

XLA's CPU runtime allocates each step's temporary buffers (hundreds of MB at ViT scale) with
malloc and frees them at the end of the step. glibc serves such large blocks with a fresh mmap
and unmaps them on free (or trims them from a per-thread arena's heap), so every step touches
its working set in new pages: the kernel zero-fills each page on its first write (a minor fault).
Measured on a 2-core host, our ViT-Ti/16 I-JEPA step at 224 px, batch 16 (benchmarks/
reference_ijepa.py's): 640 thousand minor faults and 2.2 s of system time per 9.5 s step.

    "reuse"   (default) keep freed memory in the process for the next step: no mmap for large
              blocks (they come from the main heap), no trimming of the heap's top, and one
              arena for all threads (other threads' arenas would still be shrunk). The same
              ViT-Ti step: no faults, 7.3 s. The process keeps its peak heap size until it ends.
    "system"  glibc's defaults (or whatever MALLOC_* environment variables say).

It acts only where the C library is glibc (Linux); elsewhere "reuse" does nothing and says so
in the log. It has to run before the XLA backend starts its threads (the arena limit applies to
threads that have not allocated yet), so train.py applies it first thing. On GPUs and TPUs the
step's buffers are device memory, which this does not touch; what it changes there is that the
host process (input pipeline, checkpoint copies) keeps its peak heap instead of returning it.
Not measured on an accelerator host: where host memory is tight, "system" is the safe choice.
"""
import ctypes
import ctypes.util

from absl import logging

HOST_MALLOC = ("reuse", "system")

# mallopt parameter numbers, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# mallopt takes an int and glibc stores the trim threshold as a size_t: -1 becomes SIZE_MAX,
# "never trim" (the largest int, 2 GiB, would still trim after a step that freed more).
_NEVER_TRIM = -1


def _glibc():
    """The process's glibc (ctypes.CDLL), or None when the C library is another one."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    return libc if version() else None


def configure(policy: str) -> bool:
    """Applies `policy` (one of HOST_MALLOC) to this process; returns whether it changed
    anything. Idempotent; call it before the first jax.devices()."""
    if policy not in HOST_MALLOC:
        raise ValueError(f"host_malloc={policy!r}; expected one of {HOST_MALLOC}.")
    if policy == "system":
        return False
    libc = _glibc()
    if libc is None:
        logging.info("host_malloc='reuse' needs glibc (Linux); this C library is left alone.")
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # Each call returns 1 on success.
    # All three are applied even if one is refused (a generator in all() would stop early).
    ok = all([libc.mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))])
    if not ok:
        logging.warning("host_malloc='reuse': glibc refused a mallopt setting; its defaults "
                        "stay in part.")
    return ok
