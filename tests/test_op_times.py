"""bench/scripts/op_times.py: the per-op timing mode sees every ATen op with its shapes, and counts matmul FLOPs."""

import importlib.util
from pathlib import Path

import torch

PATH = Path(__file__).resolve().parents[1] / "bench" / "scripts" / "op_times.py"


def load():
    spec = importlib.util.spec_from_file_location("op_times", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_op_times_counts_calls_shapes_and_flops():
    ot = load()
    a, b, c = torch.randn(3, 4), torch.randn(4, 5), torch.randn(2, 3, 4)
    acc = torch.zeros(3, 5)
    mode = ot.OpTimes()
    with mode:
        torch.mm(a, b)
        torch.mm(a, b)
        acc.addmm_(a, b)
        torch.bmm(c, torch.randn(2, 4, 6))
        (a * 2).sum()
    st = mode.stats
    assert st[("aten.mm", ((3, 4), (4, 5)))][0] == 2
    assert st[("aten.addmm_", ((3, 5), (3, 4), (4, 5)))][0] == 1
    assert st[("aten.mul", ((3, 4),))][0] == 1
    assert all(v[1] >= 0 and v[2] >= 0 for v in st.values())
    assert ot.matmul_flops("aten.mm", ((3, 4), (4, 5))) == 2 * 3 * 4 * 5
    assert ot.matmul_flops("aten.addmm_", ((3, 5), (3, 4), (4, 5))) == 2 * 3 * 4 * 5
    assert ot.matmul_flops("aten.bmm", ((2, 3, 4), (2, 4, 6))) == 2 * 2 * 3 * 4 * 6
