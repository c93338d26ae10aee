"""Final loss of AdamW8bit / AdamW4bit, block-wise (default) and rank-1 normalised second
moments (exp_avg_sq_norm="rank1"), relative to torch.optim.AdamW, on the digits MLP of
tests/test_optim.py (scikit-learn's digits: no download). The README's numbers for the
rank-1 option come from this script:

    .venv/bin/python tools/adamw_rank1_digits.py
"""
from __future__ import annotations

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_optim import _digits_problem, _train  # noqa: E402

from lowrank_ext.optim import AdamW4bit, AdamW8bit  # noqa: E402


def main() -> None:
    for steps in (100, 300):
        for lr in (1e-3, 3e-3):
            model, x, y = _digits_problem()
            ref_model = copy.deepcopy(model)
            ref = _train(ref_model, torch.optim.AdamW(ref_model.parameters(), lr=lr, weight_decay=0.01), x, y, steps)
            cells = []
            for cls in (AdamW8bit, AdamW4bit):
                for min_quant_size in (0, 4096):
                    for norm in ("block", "rank1"):
                        m = copy.deepcopy(model)
                        opt = cls(m.parameters(), lr=lr, weight_decay=0.01, min_quant_size=min_quant_size,
                                  exp_avg_sq_norm=norm)
                        cells.append(f"{cls.__name__} {norm} min_quant_size={min_quant_size}: "
                                     f"{_train(m, opt, x, y, steps) / ref:.3f}")
            print(f"{steps} steps, lr {lr}: AdamW loss {ref:.4f}; ours / AdamW:\n  " + "\n  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
