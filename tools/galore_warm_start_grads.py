"""How good warm-started GaLore refreshes are on real gradients (not timed: see the galore
benchmark for speed). Trains the digits MLP of the tests (scikit-learn ships the data) with
GaLoreAdamW and, at every refresh, compares the projections a refresh could make of each
GaLore layer's gradient: rsvd from a fresh sketch with 2 or 1 power iterations, and rsvd
started from the previous refresh's cold projection (the one the optimizer, which refreshes
cold here, took) with 1 or 0. Prints, per layer, the overlap of
consecutive optimal rank-r subspaces (||U_prev^T U||_F^2 / r) and each projection's error
||G - P P^T G||_F over the optimal rank-r error.

    .venv/bin/python tools/galore_warm_start_grads.py [--width 256] [--rank 32] [--gap 10]
"""
from __future__ import annotations

import argparse

import torch

from lowrank_ext.ops.svd import rsvd
from lowrank_ext.optim import GaLoreAdamW


def _error(g: torch.Tensor, proj: torch.Tensor, right: bool) -> float:
    """||G - G P^T P|| for P [r, n] (right), ||G - P P^T G|| for P [m, r] (left)."""
    g, p = g.double(), proj.double()
    return float((g - (g @ p.t()) @ p if right else g - p @ (p.t() @ g)).norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--gap", type=int, default=10, help="steps between refreshes")
    ap.add_argument("--steps", type=int, default=120)
    args = ap.parse_args()
    from sklearn.datasets import load_digits  # ships its data: no download
    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)
    torch.manual_seed(0)
    w, r = args.width, args.rank
    model = torch.nn.Sequential(torch.nn.Linear(64, w), torch.nn.ReLU(), torch.nn.Linear(w, w), torch.nn.ReLU(),
                                torch.nn.Linear(w, 10))
    opt = GaLoreAdamW(model.parameters(), lr=1e-2, rank=r, update_proj_gap=args.gap, scale=1.0)
    layers = {"first (64 -> width)": model[0], "hidden (width -> width)": model[2]}
    previous: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (last cold basis, optimal basis)
    print(f"digits MLP 64-{w}-{w}-10, rank {r}, a refresh every {args.gap} steps; error / optimal rank-{r} error")
    print("| step | layer | loss | overlap with the last refresh | cold n_iter 2 | cold n_iter 1 | warm n_iter 1 "
          "| warm n_iter 0 |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for step in range(args.steps + 1):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if step % args.gap == 0 and step > 0:
            for name, lin in layers.items():
                g = lin.weight.grad.float()
                right = g.shape[0] >= g.shape[1]  # as GaLoreAdamW: rsvd of G^T for a right projection
                gt = g.t() if right else g
                u, sv, _ = torch.linalg.svd(gt.double(), full_matrices=False)
                optimal = float(sv[r:].square().sum().sqrt())

                def ratio(basis):
                    return f"{_error(g, basis.t() if right else basis, right) / optimal:.4f}"
                cold = rsvd(gt, r, 10, 2, seed=step)[0]
                row = [str(step), name, f"{loss.item():.3f}"]
                if name in previous:
                    start, optimal_before = previous[name]
                    overlap = float((optimal_before.t() @ u[:, :r]).square().sum()) / r
                    row += [f"{overlap:.3f}", ratio(cold), ratio(rsvd(gt, r, 10, 1, seed=step)[0]),
                            ratio(rsvd(gt, r, 10, 1, seed=step, start=start)[0]),
                            ratio(rsvd(gt, r, 10, 0, seed=step, start=start)[0])]
                else:
                    row += ["-", ratio(cold), ratio(rsvd(gt, r, 10, 1, seed=step)[0]), "-", "-"]
                previous[name] = (cold, u[:, :r])
                print("| " + " | ".join(row) + " |")
        opt.step()


if __name__ == "__main__":
    main()
