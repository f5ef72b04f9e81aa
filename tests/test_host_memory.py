"""config.host_malloc (tcjepa_jax/host_memory.py): with "reuse" a large block freed and
allocated again costs no new page faults; with glibc's defaults it does. Each policy runs in
its own process (it changes the whole process's allocator)."""
import os
import subprocess
import sys
import textwrap

import pytest

from configs import synthetic_tiny
from tcjepa_jax import host_memory
from tcjepa_jax import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates, writes and frees a block the size of a step's buffers three times; prints the
# minor page faults of the last two rounds over those of the first.
_PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    from tcjepa_jax import host_memory
    print("applied", host_memory.configure(sys.argv[1]))
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
    n, faults = 256 << 20, []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(n)
        libc.memset(block, 1, n)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print("ratio", (faults[1] + faults[2]) / 2 / faults[0])
""")

glibc_only = pytest.mark.skipif(host_memory._glibc() is None,  # pylint: disable=W0212
                                reason="host_malloc acts on glibc only")


def _fault_ratio(policy: str) -> tuple:
    out = subprocess.run([sys.executable, "-c", _PROBE, policy], cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=120).stdout.split("\n")
    values = dict(line.split() for line in out if line)
    return values["applied"] == "True", float(values["ratio"])


@glibc_only
def test_reuse_keeps_freed_memory_for_the_next_allocation():
    applied, ratio = _fault_ratio("reuse")
    assert applied
    assert ratio < 0.05, f"a freed 256 MB block faulted in again ({ratio:.2f} of the first time)"


@glibc_only
def test_system_defaults_fault_the_memory_in_again():
    # The baseline the setting exists for: without it glibc unmaps the block on free.
    applied, ratio = _fault_ratio("system")
    assert not applied
    assert ratio > 0.5


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="host_malloc"):
        host_memory.configure("jemalloc")


def test_train_applies_the_configured_policy_first(monkeypatch, tmp_path):
    seen = []

    def record(policy):
        seen.append(policy)
        raise RuntimeError("stop here")

    monkeypatch.setattr(host_memory, "configure", record)
    config = synthetic_tiny.get_config()
    config.host_malloc = "system"
    config.total_steps = 1  # if configure is not called, the failure comes after one step
    with pytest.raises(RuntimeError, match="stop here"):
        train_lib.train(config, str(tmp_path / "run"))
    assert seen == ["system"]
    assert not os.listdir(tmp_path)  # before anything else: not even the workdir
