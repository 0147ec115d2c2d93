"""keep_freed_memory: a training step's freed buffers are reused, not page-faulted in again."""
import subprocess
import sys

import pytest

SCRIPT = r"""
import resource, sys
from ft_focal.training.malloc import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for step in range(6):   # like a training step: activation-sized buffers allocated, then all freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [bytearray(4 << 20) for _ in range(20)]
    del buffers
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults[2:]))
"""


def _faults(mode):
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_buffers_are_reused_without_page_faults():
    applied, kept = _faults("keep")
    if applied != "True":
        pytest.skip("not glibc")
    _, default = _faults("default")
    pages = 20 * (4 << 20) // 4096
    assert default > pages // 2      # glibc's defaults give the 80 MB back and fault it in again
    assert kept < pages // 100       # kept: the next step reuses it
