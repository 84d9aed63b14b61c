"""hold_freed_memory: a freed block is reused without page faults (counted by the kernel), in a child process
so that the test process keeps its allocator."""

import subprocess
import sys

import pytest

from xvol_compiler import host_memory

CHILD = """
import resource, sys, torch
from xvol_compiler.host_memory import hold_freed_memory, host_memory_state
if sys.argv[1] == "hold":
    hold_freed_memory()

def faults_of_one_call():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 * 2**20)  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
    t.fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

for _ in range(4):  # the heap settles: a small block may take the freed one's place once or twice
    faults_of_one_call()
print(sum(faults_of_one_call() for _ in range(4)), host_memory_state())
"""


def _steady_calls(mode: str) -> tuple[int, str]:
    """Page faults of four calls after four warm ones, and the state the child reports."""
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout
    faults, state = out.strip().split(" ", 1)
    return int(faults), state


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc only: elsewhere the allocator is left as it is")
def test_held_memory_is_reused_without_page_faults() -> None:
    pages = 64 * 2**20 // 4096
    faults, state = _steady_calls("default")
    assert faults > 2 * pages, f"glibc's default should fault a 64 MiB block in on every call, saw {faults} faults"
    assert state == host_memory.DEFAULT
    faults, state = _steady_calls("hold")
    assert faults < pages // 20, f"held memory should be reused without faults, saw {faults} in 4 x {pages} pages"
    assert state == host_memory.HELD
