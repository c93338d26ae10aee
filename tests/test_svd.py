"""The svd family: the Gaussian sketch against the Philox reference, the Jacobi SVD against
LAPACK (torch.linalg.svd), rsvd against the optimal rank-k error (spectra built with known
singular values) and the fp64 reference algorithm, the streaming update against the SVD of
the whole matrix (principal angles), reproducibility, bad inputs; the SVD-based LoRA
initialisations (PiSSA, EVA, LoRA-SB) against what they are defined to produce. The CUDA
kernels are checked against the CPU ones (test_cuda_kernels_agree_with_cpu, on a GPU)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lowrank_ext import init, linalg
from lowrank_ext.nn import LoRALinear, inject_lora
from lowrank_ext.ops import svd as ops
from lowrank_ext.reference.svd import gaussian_sketch_ref, jacobi_svd_ref, rsvd_ref, sketch_matrix_ref, svd_update_ref

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _with_spectrum(m, n, s, dtype=torch.float64, batch=()):
    """A [.., m, n] = U diag(s) V^T with random orthonormal U, V (fp64 QR of Gaussians)."""
    p = s.shape[-1]
    u = torch.linalg.qr(torch.randn(*batch, m, p, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(*batch, n, p, dtype=torch.float64)).Q
    return ((u * s.double()) @ v.transpose(-2, -1)).to(dtype)


def _orth_err(q):
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return float((q.transpose(-2, -1) @ q - eye).abs().max())


def _principal_angle_sines(u1, u2):
    """Sines of the principal angles between the column spans of orthonormal u1 and u2: the
    singular values of (I - u2 u2^T) u1 (accurate for small angles, unlike sqrt(1 - cos^2))."""
    u1, u2 = u1.double(), u2.double()
    return torch.linalg.svdvals(u1 - u2 @ (u2.transpose(-2, -1) @ u1))


# ---------------------------------------------------------------------------- gaussian_sketch

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,l", [((7, 13), 5), ((3, 40, 700), 9), ((1, 1), 1), ((2, 9), 0)])
def test_sketch_matches_reference(dtype, shape, l):
    a = torch.randn(shape).to(dtype)
    y = ops.gaussian_sketch(a, l, seed=99)
    want = gaussian_sketch_ref(a, l, 99)
    assert y.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert y.shape == (*shape[:-1], l)
    # Omega agrees to a few fp32 ulps (libm log/sin/cos vs torch's); the products then round
    torch.testing.assert_close(y, want, atol=1e-5 * a.float().abs().sum(-1).max().item(), rtol=1e-5)


def test_sketch_is_a_standard_normal_nested_in_l():
    omega = ops.gaussian_sketch(torch.eye(2000), 50, seed=3)  # A = I: Omega itself
    assert abs(omega.mean().item()) < 0.01 and abs(omega.var().item() - 1) < 0.01
    assert abs(((omega ** 4).mean() / 3 - 1).item()) < 0.03  # Gaussian kurtosis
    torch.testing.assert_close(omega, sketch_matrix_ref(2000, 50, 3), atol=2e-6, rtol=2e-6)
    wider = ops.gaussian_sketch(torch.eye(2000), 80, seed=3)
    assert torch.equal(wider[:, :50], omega)  # column-major indexing: a wider sketch extends it
    assert not torch.equal(ops.gaussian_sketch(torch.eye(2000), 50, seed=4), omega)


def test_sketch_panels_and_batch_share_omega():
    a = torch.randn(3, 5, 1500)  # 1500 columns: three 512-row panels of Omega
    y = ops.gaussian_sketch(a, 7, seed=1)
    for i in range(3):
        # GEMM blocking differs between 15 and 5 rows: sums of 1500 products agree to rounding
        torch.testing.assert_close(y[i], ops.gaussian_sketch(a[i], 7, seed=1), atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------- jacobi_svd

@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (1, 1), (5, 1), (1, 5), (40, 40), (300, 20), (20, 300),
                                   (8, 33, 17), (2, 256, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jacobi_matches_lapack(shape, dtype):
    a = torch.randn(shape, dtype=dtype)
    u, s, vh = ops.jacobi_svd(a)
    ur, sr, vhr = jacobi_svd_ref(a)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    scale = sr.max().item()
    torch.testing.assert_close(s, sr, atol=tol * scale * 10, rtol=0)
    torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, a, atol=tol * scale * 10, rtol=0)
    assert _orth_err(u) < tol * 50 and _orth_err(vh.transpose(-2, -1)) < tol * 50
    # Gaussian matrices have distinct singular values: with the sign rule the vectors are unique
    gap = (sr[..., :-1] - sr[..., 1:]).min().item() if sr.shape[-1] > 1 else 1.0
    vec_tol = tol * 10 * scale / gap
    torch.testing.assert_close(u, ur, atol=vec_tol, rtol=0)
    torch.testing.assert_close(vh, vhr, atol=vec_tol, rtol=0)


def test_jacobi_small_singular_values_to_high_relative_accuracy():
    # graded: one-sided Jacobi keeps relative accuracy in the small singular values
    s = torch.logspace(0, -10, 12, dtype=torch.float64)
    a = _with_spectrum(30, 12, s)
    got = ops.jacobi_svd(a)[1]
    torch.testing.assert_close(got, s, atol=0, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_jacobi_half_inputs_computed_in_fp32(dtype):
    a = torch.randn(4, 20, 10).to(dtype)
    u, s, vh = ops.jacobi_svd(a)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    torch.testing.assert_close(s, torch.linalg.svdvals(a.double()).float(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shape", [(7, 5), (5, 7)])
def test_jacobi_rank_deficient_and_zero(shape):
    m, n = shape
    a = torch.randn(m, 2, dtype=torch.float64) @ torch.randn(2, n, dtype=torch.float64)
    for mat in (a, torch.zeros(m, n, dtype=torch.float64)):
        u, s, vh = ops.jacobi_svd(mat)
        assert _orth_err(u) < 1e-12 and _orth_err(vh.transpose(0, 1)) < 1e-12  # completed to orthonormal
        torch.testing.assert_close(u @ torch.diag(s) @ vh, mat, atol=1e-12, rtol=0)
        torch.testing.assert_close(s, torch.linalg.svdvals(mat), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_jacobi_numerically_zero_singular_values_keep_u_orthonormal(dtype):
    # a rank-1 matrix rounded to fp16 has singular values down to ~1e-40 of the largest (fp32
    # work: subnormal columns; in fp64, columns whose squares are subnormal): their U columns
    # came out with norm 1.4 and overlapping the others; they are zero to working range now
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(1, 10, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 1, 10, generator=g,
                                                                               dtype=torch.float64))
    a = (a * 1e-3).to(torch.float16).to(dtype)
    u, s, vh = ops.jacobi_svd(a)
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    assert _orth_err(u.double()) < 100 * eps and _orth_err(vh.double().mT) < 100 * eps
    exact = torch.linalg.svdvals(a.double())
    assert float((s.double() - exact).abs().max()) <= 100 * eps * float(exact[..., 0].max())
    torch.testing.assert_close((u.double() * s.double().unsqueeze(-2)) @ vh.double(), a.double(), rtol=0,
                               atol=100 * eps * float(exact.max()))


@settings(max_examples=50, deadline=None)
@given(b=st.integers(1, 3), m=st.integers(1, 40), n=st.integers(1, 40), data=st.data(),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       magnitude=st.sampled_from([1e-30, 1e-3, 1.0, 1e30]), seed=st.integers(0, 2**31 - 1))
def test_jacobi_invariants_at_any_rank_and_scale(b, m, n, data, dtype, magnitude, seed):
    # Property: for a batch of matrices of any rank (0 included) and scale, S is LAPACK's to
    # working precision, sorted and non-negative, U and V are orthonormal, and U S Vh is A
    rank = data.draw(st.integers(0, min(m, n)), label="rank")
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, m, rank, generator=g, dtype=torch.float64) @ torch.randn(b, rank, n, generator=g,
                                                                                dtype=torch.float64)
    if dtype in (torch.float16, torch.bfloat16):  # within their range
        magnitude = min(max(magnitude, 1e-3), 1.0)
    a = (a * magnitude).to(dtype)
    u, s, vh = ops.jacobi_svd(a)
    k = min(m, n)
    assert u.shape == (b, m, k) and s.shape == (b, k) and vh.shape == (b, k, n)
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    a64 = a.double()
    exact = torch.linalg.svdvals(a64)
    bound = 100 * eps * max(m, n) * float(exact.max()) if exact.numel() else 0.0
    assert float((s.double() - exact).abs().max()) <= bound
    assert float(((u.double() * s.double().unsqueeze(-2)) @ vh.double() - a64).abs().max()) <= bound
    assert bool((s[..., :-1] >= s[..., 1:]).all()) and bool((s >= 0).all())
    assert _orth_err(u.double()) < 100 * eps * k and _orth_err(vh.double().mT) < 100 * eps * k


def test_jacobi_batch_equals_loop_and_leading_dims():
    a = torch.randn(2, 3, 9, 6)
    u, s, vh = ops.jacobi_svd(a)
    assert u.shape == (2, 3, 9, 6) and s.shape == (2, 3, 6) and vh.shape == (2, 3, 6, 6)
    for i in range(2):
        for j in range(3):
            ui, si, vhi = ops.jacobi_svd(a[i, j])
            assert torch.equal(si, s[i, j]) and torch.equal(ui, u[i, j]) and torch.equal(vhi, vh[i, j])


def test_jacobi_does_not_modify_input():
    for shape in ((4, 6), (6, 4), (30, 5)):
        a = torch.randn(shape)
        before = a.clone()
        ops.jacobi_svd(a)
        assert torch.equal(a, before)


def test_jacobi_empty():
    u, s, vh = ops.jacobi_svd(torch.randn(0, 4, 3))
    assert u.shape == (0, 4, 3) and s.shape == (0, 3) and vh.shape == (0, 3, 3)


# ---------------------------------------------------------------------------- rsvd

@pytest.fixture(params=["cpu", "cuda"])
def cpu_algorithms(request, monkeypatch):
    """The drivers' algorithms on CPU: the CPU's own (Householder QR, LAPACK's small SVD: the
    defaults there), or the ones CUDA runs (shifted CholeskyQR with its Householder fallback,
    the Jacobi kernel for the small SVD), checked here without a GPU."""
    cuda_algorithms = request.param == "cuda"
    monkeypatch.setenv("LOWRANK_CPU_ORTHONORMALIZATION", "cholesky_qr" if cuda_algorithms else "householder")
    monkeypatch.setenv("LOWRANK_CPU_SMALL_SVD", "jacobi" if cuda_algorithms else "lapack")
    return request.param


def test_cpu_algorithm_settings_are_checked(monkeypatch):
    monkeypatch.setenv("LOWRANK_CPU_ORTHONORMALIZATION", "cholesky")
    with pytest.raises(RuntimeError, match="must be 'householder' or 'cholesky_qr'"):
        ops.rsvd(torch.randn(20, 10), 3)
    monkeypatch.setenv("LOWRANK_CPU_ORTHONORMALIZATION", "householder")
    monkeypatch.setenv("LOWRANK_CPU_SMALL_SVD", "gesvd")
    with pytest.raises(RuntimeError, match="must be 'lapack' or 'jacobi'"):
        ops.rsvd(torch.randn(20, 10), 3)


DECAYS = {"geometric": lambda p: 0.9 ** torch.arange(p, dtype=torch.float64),
          "polynomial": lambda p: 1.0 / (1.0 + torch.arange(p, dtype=torch.float64)),
          "slow": lambda p: (1.0 + torch.arange(p, dtype=torch.float64)) ** -0.5}


@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("shape,k", [((400, 300), 20), ((250, 500), 32), ((1000, 120), 10), ((2048, 1024), 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rsvd_error_within_5_percent_of_optimal(decay, shape, k, dtype, cpu_algorithms):
    m, n = shape
    s = DECAYS[decay](min(m, n))
    a = _with_spectrum(m, n, s, dtype)
    u, sv, vh = linalg.rsvd(a, k, oversample=10, n_iter=2, seed=0)
    assert u.shape == (m, k) and sv.shape == (k,) and vh.shape == (k, n) and u.dtype == dtype
    err = torch.linalg.matrix_norm((u.double() * sv.double()) @ vh.double() - a.double())
    optimal = s[k:].square().sum().sqrt()
    # plus the floor of the working precision: a few unit roundoffs of ||A||_F (the fp32 A
    # itself is only that exact; 0.9^128 ~ 1e-6 is already there)
    floor = 4 * torch.finfo(dtype).eps / 2 * s.square().sum().sqrt()
    assert err <= 1.05 * optimal + floor, f"error / optimal = {float(err / optimal):.4f}"
    orth_tol = 4 * max(math.sqrt(max(m, n)), k + 10) * torch.finfo(dtype).eps  # GEMMs over l = k + 10
    assert _orth_err(u) < orth_tol and _orth_err(vh.transpose(0, 1)) < orth_tol
    assert bool((sv[:-1] >= sv[1:]).all())


def test_rsvd_matches_the_fp64_reference_algorithm(cpu_algorithms):
    s = 0.8 ** torch.arange(60, dtype=torch.float64)
    a = _with_spectrum(90, 60, s)
    u, sv, vh = ops.rsvd(a, 8, 6, 1, 5)
    # the kernel's own Omega (A = I sketches to Omega itself): the reference's Box-Muller rounds
    # differently by fp32 ulps, and the power iteration's tail carries that 1e-7 into U at
    # ~1e-9 (torch 2.11's log/sin/cos on the H100 machine: 1.03e-9)
    omega = ops.gaussian_sketch(torch.eye(60, dtype=torch.float64), 14, seed=5)
    ur, svr, vhr = rsvd_ref(a, 8, 6, 1, 5, omega=omega)  # same sketch, Householder QR, LAPACK SVD
    # with CholeskyQR: rounding differences of ~u * kappa of the power-iterated bases (seen:
    # 1e-15 with Householder QR, up to ~1e-12 allowed for CholeskyQR's)
    torch.testing.assert_close(sv, svr, atol=1e-12, rtol=0)
    torch.testing.assert_close(u, ur, atol=1e-11, rtol=0)
    torch.testing.assert_close(vh, vhr, atol=1e-11, rtol=0)


def test_rsvd_exact_on_low_rank_and_reproducible():
    a = torch.randn(200, 12) @ torch.randn(12, 150)
    u, s, vh = linalg.rsvd(a, 12, seed=7)
    rel = torch.linalg.matrix_norm(u @ torch.diag(s) @ vh - a) / torch.linalg.matrix_norm(a)
    assert rel < 1e-5
    u2, s2, vh2 = linalg.rsvd(a, 12, seed=7)
    assert torch.equal(u, u2) and torch.equal(s, s2) and torch.equal(vh, vh2)
    # a different seed: the same (exact) factors up to rounding, through a different sketch
    u3, s3, _ = linalg.rsvd(a, 12, seed=8)
    torch.testing.assert_close(s3, s, atol=1e-4 * s[0].item(), rtol=0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 80), n=st.integers(1, 80), data=st.data(), dtype=st.sampled_from([torch.float32, torch.float64]),
       oversample=st.integers(0, 12), n_iter=st.integers(0, 3), magnitude=st.sampled_from([1e-20, 1e-3, 1.0, 1e15]),
       seed=st.integers(0, 2**31 - 1))
def test_rsvd_invariants_on_matrices_of_rank_at_most_k(cpu_algorithms, m, n, data, dtype, oversample, n_iter,
                                                       magnitude, seed):
    # Property (DESIGN.md: rSVD against the optimal truncated SVD): a matrix of rank <= k lies in
    # the sketch's range whatever the sketch, so rsvd recovers it up to rounding, with its
    # nonzero singular values, whatever the shape, rank (0 included), oversampling, power
    # iterations, scale or dtype; the factors are orthonormal and S is sorted, non-negative
    k = data.draw(st.integers(1, min(m, n)), label="k")
    rank = data.draw(st.integers(0, k), label="rank")
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g,
                                                                              dtype=torch.float64) * magnitude)
    a = a.to(dtype)
    u, sv, vh = ops.rsvd(a, k, oversample, n_iter, seed)
    assert u.shape == (m, k) and sv.shape == (k,) and vh.shape == (k, n)
    eps = torch.finfo(dtype).eps
    assert _orth_err(u) < 300 * eps and _orth_err(vh.t()) < 300 * eps
    assert bool((sv >= 0).all()) and bool((sv[:-1] >= sv[1:]).all())
    norm = float(torch.linalg.matrix_norm(a.double()))
    err = float(torch.linalg.matrix_norm((u.double() * sv.double()) @ vh.double() - a.double()))
    assert err <= 1e3 * eps * norm, (err / norm if norm else err)
    exact = torch.linalg.svdvals(a.double())[:k]
    assert float((sv.double() - exact).abs().max()) <= 1e3 * eps * float(exact[0] if exact.numel() else 0.0)


def test_rsvd_signs_are_fixed():
    a = _with_spectrum(50, 40, 0.7 ** torch.arange(40, dtype=torch.float64))
    u, s, vh = ops.rsvd(a, 6)
    idx = u.abs().argmax(0)
    assert bool((u[idx, torch.arange(6)] > 0).all())
    u_neg, _, vh_neg = ops.rsvd(-a, 6)  # -A has the same U up to the sign rule, Vh negated
    torch.testing.assert_close(u_neg, u, atol=1e-10, rtol=0)
    torch.testing.assert_close(vh_neg, -vh, atol=1e-10, rtol=0)


def test_rsvd_rank_deficient_and_zero(device, cpu_algorithms):
    """Rank 3 < k + oversample: with CholeskyQR the power iterations' second Cholesky fails
    there and must fall back (on a GPU without a host sync: Householder QR selected on the
    device)."""
    a = (torch.randn(60, 3) @ torch.randn(3, 40)).to(device)
    u, s, vh = ops.rsvd(a, 8)
    assert _orth_err(u) < 1e-5 and _orth_err(vh.t()) < 1e-5
    torch.testing.assert_close(s[:3], torch.linalg.svdvals(a)[:3], atol=1e-4, rtol=1e-5)
    assert float(s[3:].max()) < 1e-5 * float(s[0])
    torch.testing.assert_close(u @ torch.diag(s) @ vh, a, atol=1e-4, rtol=0)
    u, s, vh = ops.rsvd(torch.zeros(30, 20, device=device), 5)
    assert torch.equal(s, torch.zeros(5, device=device)) and _orth_err(u) < 1e-6 and _orth_err(vh.t()) < 1e-6


def test_rsvd_batched_equals_loop_and_batched_rsvd_groups(cpu_algorithms):
    s = 1.0 / (1.0 + torch.arange(64, dtype=torch.float64))
    a = _with_spectrum(80, 64, s, torch.float32, batch=(5,))
    u, sv, vh = ops.rsvd(a, 10)
    for i in range(5):
        ui, si, vhi = ops.rsvd(a[i], 10)
        torch.testing.assert_close(si, sv[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ui, u[i], atol=1e-4, rtol=0)
        torch.testing.assert_close(vhi, vh[i], atol=1e-4, rtol=0)
    mats = [a[0], torch.randn(30, 20), a[1], torch.randn(30, 20, dtype=torch.float64)]
    out = linalg.batched_rsvd(mats, 4)
    for m, (ui, si, vhi) in zip(mats, out):
        uw, sw, vhw = ops.rsvd(m, 4)
        assert ui.dtype == uw.dtype
        torch.testing.assert_close(si, sw, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ui @ torch.diag(si) @ vhi, uw @ torch.diag(sw) @ vhw, atol=1e-4, rtol=0)


@pytest.mark.parametrize("views", ["contiguous", "transposed"])
def test_batched_rsvd_equals_rsvd_of_the_stack(device, views, cpu_algorithms):
    """The list op reads each matrix where it lies (CPU) and must give rsvd's bits for their
    stack laid out as they are (transposed views: the transposed view of a stack, as GaLore
    passed before): the same sketch, products and QRs per matrix."""
    s = 0.9 ** torch.arange(40, dtype=torch.float64)
    base = [_with_spectrum(60, 40, s, torch.float32).to(device) for _ in range(3)]
    transposed = views == "transposed"
    mats = [m.t() for m in base] if transposed else base
    got = ops.batched_rsvd(mats, 6, 5, 2, seed=4)
    want = ops.rsvd(torch.stack(base).mT if transposed else torch.stack(base), 6, 5, 2, seed=4)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.equal(g, w)
    half = ops.batched_rsvd([m.half() for m in mats], 6, 5, 2, seed=4)
    assert all(t.dtype == torch.float32 for t in half)
    torch.testing.assert_close(half[1], ops.rsvd(torch.stack(mats).half(), 6, 5, 2, seed=4)[1])


@pytest.mark.parametrize("mats,k,match", [
    ([], 2, "at least one matrix"),
    ([torch.randn(5, 4), torch.randn(5, 3)], 2, "one shape and dtype"),
    ([torch.randn(5, 4), torch.randn(5, 4, dtype=torch.float64)], 2, "one shape and dtype"),
    ([torch.randn(2, 5, 4)], 2, "2-D"),
    ([torch.randn(5, 4).int()], 2, "float32, float16, bfloat16 or float64"),
    ([torch.randn(5, 4)], 5, "k must be in"),
])
def test_batched_rsvd_bad_inputs(mats, k, match):
    with pytest.raises((RuntimeError, TypeError, ValueError), match=match):
        ops.batched_rsvd(mats, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rsvd_half_inputs_computed_in_fp32(dtype):
    a = _with_spectrum(120, 90, 0.8 ** torch.arange(90, dtype=torch.float64), dtype)
    u, s, vh = ops.rsvd(a, 6)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    u32, s32, vh32 = ops.rsvd(a.float(), 6)  # the same matrix, already widened
    torch.testing.assert_close(s, s32, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(u, u32, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- rsvd, warm-started

@pytest.mark.parametrize("j", [3, 14])  # some columns of the sketch, or all l = k + oversample
def test_rsvd_warm_start_matches_the_fp64_reference_algorithm(j, cpu_algorithms):
    s = 0.8 ** torch.arange(60, dtype=torch.float64)
    a = _with_spectrum(90, 60, s)
    start = torch.randn(90, j, dtype=torch.float64)
    u, sv, vh = ops.rsvd(a, 8, 6, 1, 5, start=start)
    ur, svr, vhr = rsvd_ref(a, 8, 6, 1, 5, start=start)  # the start, then the sketch's first 14 - j columns
    # with sketch columns (j < 14): Omega agrees with the reference's to a few fp32 ulps
    # (test_sketch_matches_reference), which a basis mostly made of the start keeps at ~1e-9 in U
    vec_tol = 1e-9 if j == 14 else 1e-8
    torch.testing.assert_close(sv, svr, atol=1e-10, rtol=0)
    torch.testing.assert_close(u, ur, atol=vec_tol, rtol=0)
    torch.testing.assert_close(vh, vhr, atol=vec_tol, rtol=0)
    u0, _, _ = ops.rsvd(a, 8, 6, 1, 5)  # and the start is used: not the cold call's factors
    assert float((u - u0).abs().max()) > 1e-6


def test_rsvd_warm_start_from_the_exact_subspace_needs_no_iteration(cpu_algorithms):
    """Started from A's top-k left singular vectors, with no sketch columns and no power
    iteration, rsvd is the Rayleigh-Ritz step on that subspace: the truncated SVD itself."""
    s = 1.0 / (1.0 + torch.arange(50, dtype=torch.float64))
    a = _with_spectrum(70, 50, s)
    uu, ss, vvh = torch.linalg.svd(a, full_matrices=False)
    u, sv, vh = ops.rsvd(a, 6, 0, 0, 0, start=uu[:, :6])
    torch.testing.assert_close(sv, ss[:6], atol=1e-12, rtol=0)
    torch.testing.assert_close(u @ torch.diag(sv) @ vh, uu[:, :6] @ torch.diag(ss[:6]) @ vvh[:6], atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rsvd_warm_start_tracks_a_drifting_matrix(dtype, cpu_algorithms):
    """A slow spectrum (sigma_i = i^-1/2, where a cold start needs its power iterations) that
    changes a little between calls: one power iteration from the previous U is within 1.005x
    of the optimal rank-k error at every call (measured ~1.001; a cold start's two iterations
    ~1.003) and better than a cold start with one iteration (~1.015)."""
    m, n, k = 300, 200, 16
    s = (1.0 + torch.arange(n, dtype=torch.float64)) ** -0.5
    base = _with_spectrum(m, n, s)
    noise_scale = 0.3 * float(s[k]) / (m ** 0.5 + n ** 0.5)  # ||noise||_2 ~ 0.3 sigma_k
    u = None
    for step in range(4):
        a = (base + noise_scale * torch.randn(m, n, dtype=torch.float64)).to(dtype)
        optimal = torch.linalg.svdvals(a.double())[k:].square().sum().sqrt()
        if u is None:
            u, sv, vh = ops.rsvd(a, k, 10, 2, seed=step)
            continue
        u, sv, vh = ops.rsvd(a, k, 10, 1, seed=step, start=u)
        err = torch.linalg.matrix_norm((u.double() * sv.double()) @ vh.double() - a.double())
        assert err <= 1.005 * optimal, f"step {step}: warm error / optimal = {float(err / optimal):.4f}"
        assert _orth_err(u) < 100 * torch.finfo(dtype).eps
        uc, sc, vhc = ops.rsvd(a, k, 10, 1, seed=step)  # a cold start with as many iterations: worse
        cold = torch.linalg.matrix_norm((uc.double() * sc.double()) @ vhc.double() - a.double())
        assert err < cold, f"step {step}: warm {float(err / optimal):.4f}, cold {float(cold / optimal):.4f}"


def test_batched_rsvd_warm_start_equals_rsvd_of_the_stack(cpu_algorithms):
    s = 0.9 ** torch.arange(40, dtype=torch.float64)
    mats = [_with_spectrum(60, 40, s, torch.float32) for _ in range(3)]
    start = torch.randn(3, 60, 4, dtype=torch.float64)  # any float dtype: computed in A's work dtype
    got = ops.batched_rsvd(mats, 6, 5, 1, seed=4, start=start)
    want = ops.rsvd(torch.stack(mats), 6, 5, 1, seed=4, start=start)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    per_matrix = linalg.batched_rsvd(mats, 6, 5, 1, seed=4, start=list(start))  # grouped: one call
    for i, (u, sv, vh) in enumerate(per_matrix):
        assert torch.equal(u, got[0][i]) and torch.equal(sv, got[1][i])


def test_rsvd_of_a_non_finite_start_is_nan_and_leaves_the_others(cpu_algorithms):
    a = torch.randn(3, 40, 30)
    start = torch.randn(3, 40, 5)
    start[1, 3, 2] = float("nan")
    u, s, vh = ops.rsvd(a, 5, 3, 1, start=start)
    for t in (u, s, vh):
        assert torch.isnan(t[1]).all() and not torch.isnan(t[0]).any() and not torch.isnan(t[2]).any()
    u0, s0, _ = ops.rsvd(a[0], 5, 3, 1, start=start[0])
    torch.testing.assert_close(s[0], s0)


@pytest.mark.parametrize("call,match", [
    (lambda: ops.rsvd(torch.randn(10, 8), 3, 2, start=torch.randn(10, 6)), "between 1 and l = .* = 5 columns"),
    (lambda: ops.rsvd(torch.randn(10, 8), 3, 2, start=torch.randn(10, 0)), "between 1 and"),
    (lambda: ops.rsvd(torch.randn(10, 8), 3, 9, start=torch.randn(10, 9)), "= 8 columns"),  # l capped at n
    (lambda: ops.rsvd(torch.randn(10, 8), 3, start=torch.randn(9, 3)), "\\[m, j\\] with m = 10"),
    (lambda: ops.rsvd(torch.randn(10, 8), 3, start=torch.randn(1, 10, 3)), "\\[m, j\\]"),
    (lambda: ops.rsvd(torch.randn(2, 10, 8), 3, start=torch.randn(10, 3)), "\\[batch, m, j\\] with batch = 2"),
    (lambda: ops.rsvd(torch.randn(2, 10, 8), 3, start=torch.randn(3, 10, 3)), "batch = 2"),
    (lambda: ops.rsvd(torch.randn(10, 8), 3, start=torch.ones(10, 3, dtype=torch.int32)), "start must be float"),
    (lambda: ops.batched_rsvd([torch.randn(10, 8)] * 2, 3, start=torch.randn(10, 3)), "batch = 2"),
    (lambda: linalg.batched_rsvd([torch.randn(10, 8)] * 2, 3, start=[torch.randn(10, 3)]), "one tensor per matrix"),
    (lambda: linalg.batched_rsvd([torch.randn(10, 8)] * 2, 3, start=[torch.randn(10, 3), torch.randn(10, 2)]),
     "same number of columns"),
])
def test_rsvd_warm_start_bad_inputs(call, match):
    with pytest.raises((RuntimeError, TypeError, ValueError), match=match):
        call()


def test_rsvd_compiles_without_graph_breaks():
    a = torch.randn(64, 48)
    fn = torch.compile(lambda x: linalg.rsvd(x * 2.0, 5, seed=1), fullgraph=True, backend="aot_eager")
    u, s, vh = fn(a)
    ue, se, vhe = linalg.rsvd(a * 2.0, 5, seed=1)
    torch.testing.assert_close(s, se)
    torch.testing.assert_close(u, ue)


@pytest.mark.parametrize("call,match", [
    (lambda: ops.rsvd(torch.randn(10, 8), 9), "k must be in"),
    (lambda: ops.rsvd(torch.randn(10, 8), 0), "k must be in"),
    (lambda: ops.rsvd(torch.randn(10, 8), 3, -1), "oversample"),
    (lambda: ops.rsvd(torch.randn(10, 8), 3, 5, -2), "n_iter"),
    (lambda: ops.rsvd(torch.randn(10), 1), "2-D"),
    (lambda: ops.rsvd(torch.randn(2, 2, 10, 8), 1), "2-D"),
    (lambda: ops.rsvd(torch.ones(10, 8, dtype=torch.int32), 1), "float"),
    (lambda: ops.gaussian_sketch(torch.randn(4, 4), -1, 0), "l must be"),
    (lambda: ops.jacobi_svd(torch.ones(4, 4, dtype=torch.int64)), "float"),
    (lambda: ops.svd_update(torch.randn(5, 2), torch.ones(3), torch.randn(5, 4), 2), "do not fit"),
    (lambda: ops.svd_update(torch.randn(5, 2), torch.ones(2), torch.randn(6, 4), 2), "do not fit"),
    (lambda: ops.svd_update(torch.randn(5, 2), torch.ones(2), torch.randn(5, 4), 6), "k must be in"),
])
def test_bad_inputs(call, match):
    with pytest.raises((RuntimeError, TypeError, ValueError), match=match):
        call()


@pytest.mark.cuda
def test_cuda_kernels_agree_with_cpu():
    """Same Philox sketch, same Jacobi order and formula, same drivers: CPU and CUDA agree up
    to rounding (libm vs CUDA transcendental ulps, GEMM summation orders, and the CPU's
    Householder QR against CUDA's CholeskyQR in fp64)."""
    a = torch.randn(3, 70, 1100)
    torch.testing.assert_close(ops.gaussian_sketch(a.cuda(), 19, 5).cpu(), ops.gaussian_sketch(a, 19, 5),
                               atol=1e-4, rtol=1e-4)
    m = torch.randn(6, 40, 33, dtype=torch.float64)
    for got, want in zip(ops.jacobi_svd(m.cuda()), ops.jacobi_svd(m)):
        torch.testing.assert_close(got.cpu(), want, atol=1e-10, rtol=0)
    # the Jacobi kernel's two forms: columns in shared memory (fp32 up to ~140-165 columns on
    # an H100) and in global memory (this fp64 180-column one, ~0.55 MB); the block's warps, one
    # per pair, from 32 down to 1 (p = 2)
    for mat in (torch.randn(3, 200, 180, dtype=torch.float64), torch.randn(4, 5, 2, dtype=torch.float64)):
        for got, want in zip(ops.jacobi_svd(mat.cuda()), ops.jacobi_svd(mat)):
            torch.testing.assert_close(got.cpu(), want, atol=1e-8, rtol=0)
    a32 = _with_spectrum(96, 64, 0.97 ** torch.arange(64, dtype=torch.float64), dtype=torch.float32, batch=(5,))
    u, sv, vh = (t.cpu() for t in ops.jacobi_svd(a32.cuda()))
    torch.testing.assert_close(sv, ops.jacobi_svd(a32)[1], atol=1e-5, rtol=0)
    assert float((u * sv.unsqueeze(1) @ vh - a32).abs().max()) < 1e-5
    assert _orth_err(u) < 1e-5 and _orth_err(vh.transpose(1, 2)) < 1e-5
    s = 0.8 ** torch.arange(60, dtype=torch.float64)
    b = _with_spectrum(90, 60, s, batch=(2,))
    for got, want in zip(ops.rsvd(b.cuda(), 8), ops.rsvd(b, 8)):
        torch.testing.assert_close(got.cpu(), want, atol=1e-8, rtol=0)
    start = torch.randn(2, 90, 5, dtype=torch.float64)  # warm start: the start's columns, then the sketch's
    for got, want in zip(ops.rsvd(b.cuda(), 8, 6, 1, start=start.cuda()), ops.rsvd(b, 8, 6, 1, start=start)):
        torch.testing.assert_close(got.cpu(), want, atol=1e-8, rtol=0)
    u, sv, vh = ops.rsvd(torch.zeros(30, 20, device="cuda"), 5)  # the device-side Householder fallback
    assert float(sv.abs().max()) == 0 and _orth_err(u.cpu()) < 1e-5
    x = torch.randn(40, 100, dtype=torch.float64)
    for got, want in zip(ops.svd_update(torch.zeros(40, 0, dtype=torch.float64, device="cuda"),
                                        torch.zeros(0, dtype=torch.float64, device="cuda"), x.cuda(), 6),
                         ops.svd_update(torch.zeros(40, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64),
                                        x, 6)):
        torch.testing.assert_close(got.cpu(), want, atol=1e-8, rtol=0)


# ---------------------------------------------------------------------------- svd_update / StreamingSVD

def test_svd_update_exact_while_rank_fits(cpu_algorithms):
    a = torch.randn(40, 6, dtype=torch.float64) @ torch.randn(6, 30, dtype=torch.float64)
    u0, s0, _ = torch.linalg.svd(a[:, :10], full_matrices=False)
    u, s = ops.svd_update(u0[:, :6], s0[:6], a[:, 10:], 6)
    ur, sr = svd_update_ref(u0[:, :6], s0[:6], a[:, 10:], 6)
    torch.testing.assert_close(s, sr, atol=1e-10, rtol=0)
    torch.testing.assert_close(u, ur, atol=1e-8, rtol=0)
    torch.testing.assert_close(s, torch.linalg.svdvals(a)[:6], atol=1e-10, rtol=0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 70), n=st.integers(1, 150), data=st.data(), dtype=st.sampled_from([torch.float32, torch.float64]),
       magnitude=st.sampled_from([1e-20, 1e-3, 1.0, 1e15]), seed=st.integers(0, 2**31 - 1))
def test_streaming_is_exact_on_matrices_of_rank_at_most_k(cpu_algorithms, m, n, data, dtype, magnitude, seed):
    # Property: streamed over any split into column blocks, a matrix of rank <= k is tracked
    # exactly: its singular values, and a U whose span holds every column (orthonormal where
    # the singular values are nonzero)
    k, oversample = data.draw(st.integers(1, 20), label="k"), data.draw(st.integers(0, 8), label="oversample")
    rank = data.draw(st.integers(0, min(k, m, n)), label="rank")
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g,
                                                                              dtype=torch.float64) * magnitude)
    a = a.to(dtype)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=5), label="cuts"))) if n > 1 else []
    svd = linalg.StreamingSVD(k, oversample)
    for lo, hi in zip([0] + cuts, cuts + [n]):
        svd.update(a[:, lo:hi])
    kk = min(k, m, n)
    u, sv = svd.U.double(), svd.S.double()
    assert u.shape == (m, kk) and sv.shape == (kk,)
    eps = torch.finfo(dtype).eps
    exact = torch.linalg.svdvals(a.double())[:kk]
    top = float(exact[0])
    assert float((sv - exact).abs().max()) <= 1e3 * eps * top
    a64 = a.double()
    assert float(torch.linalg.matrix_norm(a64 - u @ (u.t() @ a64))) <= 1e3 * eps * float(torch.linalg.matrix_norm(a64))
    nonzero = int((exact > 1e3 * eps * top).sum())
    if nonzero:
        assert _orth_err(u[:, :nonzero]) < 300 * eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_agrees_with_whole_matrix_top_k_subspace(dtype, cpu_algorithms):
    m, n, k = 200, 3000, 12
    signal = _with_spectrum(m, n, torch.linspace(10, 5, k, dtype=torch.float64))
    a = (signal + 1e-3 * torch.randn(m, n, dtype=torch.float64) / math.sqrt(n)).to(dtype)
    svd = linalg.StreamingSVD(k)
    for block in a.split(128, dim=1):
        svd.update(block)
    assert svd.columns_seen == n and svd.U.shape == (m, k) and svd.U.dtype == dtype
    uw, sw, _ = torch.linalg.svd(a.double(), full_matrices=False)
    sines = _principal_angle_sines(svd.U.double(), uw[:, :k])
    assert float(sines.max()) < (1e-6 if dtype == torch.float64 else 1e-4)
    torch.testing.assert_close(svd.S.double(), sw[:k], atol=1e-6 * 10, rtol=1e-5)
    assert _orth_err(svd.U) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_streaming_truncation_keeps_the_top_subspace_with_a_gap():
    # rank 40 > k + oversample: every update truncates; a clear gap after k keeps the top k
    m, n, k = 100, 2000, 5
    s = torch.cat([torch.full((k,), 10.0, dtype=torch.float64), torch.full((35,), 0.1, dtype=torch.float64)])
    a = _with_spectrum(m, n, s)
    svd = linalg.StreamingSVD(k, oversample=5)
    for block in a.split(100, dim=1):
        svd.update(block)
    uw = torch.linalg.svd(a, full_matrices=False).U[:, :k]
    assert float(_principal_angle_sines(svd.U, uw).max()) < 0.05


def test_streaming_errors_and_small_first_block():
    svd = linalg.StreamingSVD(4)
    svd.update(torch.randn(10, 2))  # fewer columns than k so far
    assert svd.U.shape == (10, 2)
    svd.update(torch.randn(10, 0))
    with pytest.raises(ValueError, match="rows"):
        svd.update(torch.randn(11, 3))
    with pytest.raises(ValueError, match="positive"):
        linalg.StreamingSVD(0)


def test_svd_update_without_new_columns_truncates_into_new_tensors():
    # c = 0: the top k of [U diag(S)], as the reference and the fake kernel say, in fresh
    # tensors (it returned S itself, untruncated)
    u0, s0, _ = torch.linalg.svd(torch.randn(20, 6, dtype=torch.float64), full_matrices=False)
    u, s = ops.svd_update(u0, s0, torch.zeros(20, 0, dtype=torch.float64), 3)
    ur, sr = svd_update_ref(u0, s0, torch.zeros(20, 0, dtype=torch.float64), 3)
    assert u.shape == (20, 3) and s.shape == (3,)
    torch.testing.assert_close(s, sr, atol=1e-12, rtol=0)
    torch.testing.assert_close(u, ur, atol=1e-10, rtol=0)
    assert s.data_ptr() != s0.data_ptr() and u.data_ptr() != u0.data_ptr()
    torch.library.opcheck(torch.ops.lowrank.svd_update.default, (u0, s0, torch.zeros(20, 0, dtype=torch.float64), 3))


def test_rsvd_huge_oversample_is_capped_not_overflowed():
    a = torch.randn(30, 20, dtype=torch.float64)
    u, s, vh = ops.rsvd(a, 4, 2 ** 63 - 1)  # k + oversample overflowed int64 (l < 0 error)
    torch.testing.assert_close(s, torch.linalg.svdvals(a)[:4], atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------- init

def test_pissa_keeps_the_function_and_takes_the_principal_part():
    base = torch.nn.Linear(48, 32)
    w0 = base.weight.detach().clone()
    x = torch.randn(7, 48)
    y0 = base(x).detach()
    layer = init.pissa_init(base, r=6, alpha=12, n_iter=None)  # exact SVD
    torch.testing.assert_close(layer(x), y0, atol=1e-5, rtol=1e-5)
    u, s, vh = torch.linalg.svd(w0.double())
    delta = layer.scaling * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
    torch.testing.assert_close(delta, (u[:, :6] * s[:6]) @ vh[:6], atol=1e-5, rtol=0)
    # the residual is W minus its top-6 part: its singular values are W's 7th onwards
    torch.testing.assert_close(torch.linalg.svdvals(layer.base_layer.weight.double())[:26], s[6:], atol=1e-5,
                               rtol=0)
    layer2 = init.pissa_init(torch.nn.Linear(48, 32), r=4)  # randomized default
    assert isinstance(layer2, LoRALinear) and layer2.r == 4


def test_eva_sets_a_to_the_top_right_singular_vectors_of_inputs():
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    inject_lora(model, ["0", "2"], r=4)
    batches = [torch.randn(5, 10, 16) for _ in range(6)]
    x0 = torch.cat([b.reshape(-1, 16) for b in batches])
    with torch.no_grad():
        x2 = torch.relu(model[0].base_layer(x0))  # B = 0: the LoRA layer is the base
        y_before = model(batches[0])
    values = init.eva_init(model, batches, oversample=20)  # tracks 24 >= d_in directions: exact
    for layer, x in ((model[0], x0), (model[2], x2)):
        a = layer.lora_A["default"].weight.detach().double()
        _, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
        assert float(_principal_angle_sines(a.t(), vh[:4].t()).max()) < 1e-3
    torch.testing.assert_close(values["0"].double(), torch.linalg.svdvals(x0.double())[:4], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(model(batches[0]), y_before)  # B still zero: same function
    with pytest.raises(ValueError, match="no LoRALinear"):
        init.eva_init(torch.nn.Linear(3, 3), [torch.randn(2, 3)])


def test_lora_sb_starts_at_the_projected_first_step():
    base = torch.nn.Linear(40, 30)
    grad = torch.randn(30, 40)
    layer = init.lora_sb_init(base, grad, lr=0.01, r=5, n_iter=None)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    core = layer.lora_core["default"]
    assert not a.requires_grad and not b.requires_grad and core.requires_grad
    u, s, vh = torch.linalg.svd(-0.01 * grad.double())
    best = (u[:, :5] * s[:5]) @ vh[:5]
    delta = layer.scaling * b.double() @ core.double() @ a.double()
    torch.testing.assert_close(delta, best, atol=1e-6, rtol=0)
    assert _orth_err(b) < 1e-5 and _orth_err(a.t()) < 1e-5
    with pytest.raises(ValueError, match="shape"):
        init.lora_sb_init(torch.nn.Linear(4, 3), torch.randn(4, 3), lr=1.0, r=2)


def test_lora_sb_keeps_an_fp64_layer_in_fp64():
    base = torch.nn.Linear(40, 30).double()
    grad = torch.randn(30, 40, dtype=torch.float64)
    layer = init.lora_sb_init(base, grad, lr=0.01, r=5, n_iter=None)
    a, b, core = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_core["default"]
    u, s, vh = torch.linalg.svd(-0.01 * grad)
    best = (u[:, :5] * s[:5]) @ vh[:5]
    # the exact SVD in fp64: fp64 rounding, not the ~1e-7 of a gradient cast to fp32
    torch.testing.assert_close(layer.scaling * b @ core @ a, best, atol=1e-12, rtol=0)


def test_pissa_keeps_an_fp64_weight_in_fp64():
    base = torch.nn.Linear(48, 32).double()
    x = torch.randn(7, 48, dtype=torch.float64)
    y0 = base(x).detach()
    layer = init.pissa_init(base, r=6, alpha=12, n_iter=None)
    torch.testing.assert_close(layer(x), y0, atol=1e-12, rtol=1e-12)


def test_eva_takes_layers_called_with_a_keyword_input():
    class KeywordCaller(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 8)

        def forward(self, t):
            return self.proj(x=t)
    model = KeywordCaller()
    inject_lora(model, ["proj"], r=2)
    init.eva_init(model, [torch.randn(4, 16) for _ in range(3)], oversample=8)
    assert model.proj.lora_A["default"].weight.abs().sum() > 0


def test_rsvd_of_a_transposed_batch_reads_it_in_place():
    # GaLore's right projections take rsvd(G^T) of a stacked batch: a strided view, not copied
    # on CPU; the same factors as for the copy, up to rounding
    a = _with_spectrum(40, 30, 1.0 / (1.0 + torch.arange(30.0)), dtype=torch.float32, batch=(3,))
    view = a.mT
    assert not view.is_contiguous()
    got = ops.rsvd(view, 6, 4, 1, 11)
    want = ops.rsvd(view.contiguous(), 6, 4, 1, 11)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ops.gaussian_sketch(view, 5, 3), ops.gaussian_sketch(view.contiguous(), 5, 3),
                               atol=1e-5, rtol=1e-5)
    for g, w in zip(ops.jacobi_svd(view), ops.jacobi_svd(view.contiguous())):  # the same view path
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- edge cases found by adversarial testing

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [1, 2, 5, 100])
def test_streaming_on_data_of_lower_rank_than_it_keeps(dtype, block, cpu_algorithms):
    # rank 3 < k + oversample: later blocks lie in span(U), their residual is rounding noise;
    # U must stay orthonormal and S must not count a direction twice
    a = (torch.randn(64, 3, dtype=torch.float64) @ torch.randn(3, 60, dtype=torch.float64)).to(dtype)
    svd = linalg.StreamingSVD(k=6)
    for b in a.split(block, dim=1):
        svd.update(b)
    want = torch.linalg.svdvals(a.double())[:6]
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(svd.S.double(), want, atol=100 * eps * float(want[0]), rtol=0)
    assert _orth_err(svd._u) < 100 * eps * math.sqrt(64)


def test_svd_update_with_x_inside_span_u():
    u = torch.zeros(5, 1, dtype=torch.float64)
    u[0, 0] = 1
    x = torch.zeros(5, 1, dtype=torch.float64)
    x[0, 0] = 3  # exactly in span(U): a zero residual
    un, sn = ops.svd_update(u, torch.tensor([2.0], dtype=torch.float64), x, 2)
    torch.testing.assert_close(sn, torch.tensor([math.sqrt(13.0), 0.0], dtype=torch.float64), atol=1e-14, rtol=0)
    torch.testing.assert_close(un.t() @ un, torch.eye(2, dtype=torch.float64), atol=1e-14, rtol=0)
    torch.testing.assert_close(un[:, 0].abs(), u[:, 0])


@pytest.mark.parametrize("dtype, scales", [(torch.float32, (1e20, 1e-30)), (torch.float64, (1e160, 1e-160))])
def test_jacobi_and_rsvd_of_huge_and_tiny_matrices(dtype, scales, cpu_algorithms):
    # the squares of such entries overflow or underflow; the result must scale with A
    a = torch.randn(30, 20, dtype=torch.float64)
    s_ref = torch.linalg.svdvals(a)
    for scale in scales:
        s = ops.jacobi_svd((a * scale).to(dtype))[1].double() / scale
        torch.testing.assert_close(s, s_ref, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
        s3 = linalg.rsvd((a * scale).to(dtype), 3)[1].double() / scale
        torch.testing.assert_close(s3, s_ref[:3], rtol=1e-2, atol=0)  # an approximation: top 3 of a random matrix
    d = torch.diag(torch.tensor([3e20, 1e-25])).to(dtype)
    s = ops.jacobi_svd(d)[1]
    assert float(s[0]) == pytest.approx(3e20, rel=1e-6) and 0 <= float(s[1]) <= 1e-6 * 3e20


def test_jacobi_of_non_finite_matrices_is_nan_and_leaves_the_others():
    a = torch.randn(3, 6, 4)
    a[1, 2, 1] = float("inf")
    a[2, 0, 0] = float("nan")
    u, s, vh = ops.jacobi_svd(a)
    for t in (u, s, vh):
        assert torch.isnan(t[1]).all() and torch.isnan(t[2]).all()
    u0, s0, vh0 = ops.jacobi_svd(a[0])
    assert torch.equal(u[0], u0) and torch.equal(s[0], s0) and torch.equal(vh[0], vh0)


def test_rsvd_of_non_finite_matrices_is_nan_and_leaves_the_others(cpu_algorithms):
    clean = torch.randn(3, 40, 30)
    a = clean.clone()
    a[1, 2, 1] = float("inf")
    a[2, 0, 0] = float("nan")
    u, s, vh = linalg.rsvd(a, 5)
    for t in (u, s, vh):
        assert torch.isnan(t[1]).all() and torch.isnan(t[2]).all()
    for t, t0 in zip((u, s, vh), linalg.rsvd(clean, 5)):  # the same batch without them: same bits
        assert torch.equal(t[0], t0[0])
    torch.testing.assert_close(s[0].double(), torch.linalg.svdvals(a[0].double())[:5], rtol=0.1, atol=0)


def test_galore_step_with_a_huge_gradient_stays_finite():
    from lowrank_ext.optim import GaLoreAdamW
    p = torch.nn.Parameter(torch.randn(64, 32))
    opt = GaLoreAdamW([p], lr=1e-2, rank=4)
    p.grad = torch.randn(64, 32) * 1e20
    opt.step()
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("shape", [(1, 6), (6, 1), (3, 5)])
def test_inits_refuse_a_rank_above_the_weight_s_smaller_side(shape):
    # the exact SVD's u[:, :r] returned fewer columns, broadcast r times into A and B
    d_out, d_in = shape
    for make in (lambda: init.pissa_init(torch.nn.Linear(d_in, d_out), r=4, n_iter=None),
                 lambda: init.lora_sb_init(torch.nn.Linear(d_in, d_out), torch.randn(d_out, d_in), lr=0.1, r=4,
                                           n_iter=None)):
        with pytest.raises(ValueError, match="exceeds min"):
            make()


def test_eva_restores_each_submodule_s_mode_and_writes_nothing_on_error():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 8),
                                torch.nn.BatchNorm1d(8))
    inject_lora(model, ["0", "2"], r=2)
    model.train()
    model[3].eval()  # a frozen BatchNorm inside a training model
    modes = {name: m.training for name, m in model.named_modules()}
    init.eva_init(model, [torch.randn(6, 8) for _ in range(2)])
    assert {name: m.training for name, m in model.named_modules()} == modes
    # a layer that saw too few inputs: no A is written, not even the layers' that saw enough

    class OneCalled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.called, self.idle = LoRALinear(torch.nn.Linear(8, 8), r=2), LoRALinear(torch.nn.Linear(8, 8), r=2)

        def forward(self, x):
            return self.called(x)

    partial = OneCalled()
    a0 = partial.called.lora_A["default"].weight.detach().clone()
    with pytest.raises(ValueError, match="idle saw 0 input vectors"):
        init.eva_init(partial, [torch.randn(6, 8)])
    assert torch.equal(partial.called.lora_A["default"].weight, a0)


def test_inits_refuse_a_merged_adapter():
    # a new A / B / core written into a merged layer: unmerge() then took the new adapter out of
    # a weight that held the old one
    layer = LoRALinear(torch.nn.Linear(8, 6), r=2)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    layer.merge()
    w = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="unmerge"):
        init.eva_init(torch.nn.Sequential(layer), [torch.randn(4, 8)])
    sb = LoRALinear(torch.nn.Linear(8, 6), r=2, core=True)
    sb.merge()
    with pytest.raises(ValueError, match="unmerge"):
        init.lora_sb_init(sb, torch.randn(6, 8), lr=0.1)
    assert torch.equal(layer.base_layer.weight, w)


def test_batched_qr_after_set_num_threads_does_not_hang():
    # torch.set_num_threads (also what torch.utils.benchmark.Timer does) made MKL's geqrf, called
    # on each thread of the batch's parallel QRs, wait for a nested thread team for ever
    import subprocess
    import sys
    code = ("import torch, lowrank_ext\n"
            "from lowrank_ext.linalg import batched_rsvd\n"
            "torch.set_num_threads(2)\n"
            "out = batched_rsvd([torch.randn(512, 256) for _ in range(8)], 16)\n"
            "print(all(bool(torch.isfinite(s).all()) and float(s[0]) > 0 for _, s, _ in out))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("True")


def test_pissa_init_on_a_layer_holding_an_adapter_keeps_its_function():
    # the adapter already there was dropped: W alone was decomposed and A, B overwritten
    torch.manual_seed(0)
    layer = init.pissa_init(torch.nn.Linear(48, 32), r=4, n_iter=None)
    x = torch.randn(5, 48)
    with torch.no_grad():
        layer.lora_B["default"].weight.add_(torch.randn(32, 4))  # "trained"
    want = layer(x).detach()
    init.pissa_init(layer, n_iter=None)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_seeds_are_read_as_64_bit_patterns():
    # torch's own seeds are unsigned 64-bit: 2**64 - 1 raised "expected int, found int"
    a = torch.randn(20, 12)
    for big, same in ((2 ** 64 - 1, -1), (2 ** 63, -2 ** 63)):
        torch.testing.assert_close(linalg.rsvd(a, 3, seed=big), linalg.rsvd(a, 3, seed=same), rtol=0, atol=0)
        torch.testing.assert_close(ops.gaussian_sketch(a, 4, seed=big), ops.gaussian_sketch(a, 4, seed=same),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (2, 0, 4), (0, 3, 4)])
def test_jacobi_svd_wrapper_takes_empty_matrices(shape):
    a = torch.empty(shape)
    u, s, vh = ops.jacobi_svd(a)
    want = torch.linalg.svd(a, full_matrices=False)
    assert (u.shape, s.shape, vh.shape) == (want.U.shape, want.S.shape, want.Vh.shape)


def test_fakes_do_not_guard_on_which_side_is_smaller():
    # a Python min(m, n) over SymInts guarded on m >= n: one recompile when a dynamic dim crossed
    # the other (rsvd, jacobi_svd, galore_project)
    import torch._dynamo
    import torch.fx.experimental._config as fx_config
    from torch._dynamo.testing import CompileCounter

    from lowrank_ext.ops.galore import galore_project
    from lowrank_ext.ops.svd import jacobi_svd, rsvd
    proj = torch.randn(2, 4)
    cases = [(lambda g: galore_project(g, proj, rank=2, right=True), lambda m: torch.randn(m, 4)),
             (lambda a: jacobi_svd(a)[1][:, :1], lambda m: torch.randn(2, m, 4)),
             (lambda a: rsvd(a, 1, 1, 1)[1], lambda m: torch.randn(m, 4))]
    with fx_config.patch(use_duck_shape=False):
        for fn, make in cases:
            torch._dynamo.reset()
            counter = CompileCounter()
            compiled = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
            for m in (3, 7, 9):  # 3 < n = 4 < 7
                compiled(make(m))
            assert counter.frame_count == 1


def test_inits_that_raise_leave_the_linear_trainable():
    base = nn.Linear(4, 8)
    with pytest.raises(ValueError):
        init.pissa_init(base, r=16)  # r > min(d_out, d_in)
    assert base.weight.requires_grad and base.bias.requires_grad
    with pytest.raises(ValueError):
        init.lora_sb_init(base, torch.randn(3, 3), lr=1e-3, r=2)  # grad of the wrong shape
    assert base.weight.requires_grad
