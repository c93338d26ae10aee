"""torch.library.opcheck on every sample of every op: schema, fake kernel, dispatch and
(where registered) autograd agree with the real kernels."""
from __future__ import annotations

import pytest
import torch

from lowrank_ext.ops import CPU_ONLY_OPS
from samples import SAMPLES


def _cases():
    for op, make in sorted(SAMPLES.items()):
        for s in make("cpu"):
            yield pytest.param(op, s, id=f"{op}-{s.name}")


@pytest.mark.parametrize("op,sample", list(_cases()))
def test_opcheck_cpu(op, sample):
    fn = getattr(torch.ops.lowrank, op.split("::")[1]).default
    torch.library.opcheck(fn, sample.args, sample.kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("op", sorted(set(SAMPLES) - CPU_ONLY_OPS))
def test_opcheck_cuda(op):
    fn = getattr(torch.ops.lowrank, op.split("::")[1]).default
    for s in SAMPLES[op]("cuda"):
        torch.library.opcheck(fn, s.args, s.kwargs)
