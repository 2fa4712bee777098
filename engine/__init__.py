"""Run-time inference: KV cache, sampling, detokenization, the batched generation loop.

Importing this package before torch sets OpenMP's wait policy to PASSIVE (unless the environment already
chose one). Why: torch's libgomp busy-waits up to 300,000 spins at every barrier while it believes it has
a CPU per thread. On a shared or oversubscribed CPU the spinning threads steal the time slices of the
threads doing the work, and CPU decode ran ~10x slower (measured on 2 busy cores: a 8x576 @ 576x1536
matmul loop 8.0 s vs 0.22 s). It showed up "when the engine was built in a thread that then exited"
only because libgomp throttles spinning to 1,000 spins once it manages more threads than CPUs, and a
still-living loading thread kept its idle pool threads counted. Sleeping waits remove the dependence on
which thread loaded the model; `engine.engine.openmp_wait_policy()` reports what is in effect.
libgomp reads the variable once, when torch loads it, so this must run before `import torch`.
"""
import os
import sys

OPENMP_WAIT_POLICY_PRESET = "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ
if OPENMP_WAIT_POLICY_PRESET:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
