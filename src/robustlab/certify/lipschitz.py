"""Upper bounds on a network's L2 Lipschitz constant, by walking its torch.fx graph.

Tsuzuku, Sato & Sugiyama (NeurIPS 2018): a composition's constant is at most the product
of its parts', a sum's at most the sum of its branches'. Each operation of the traced
graph contributes a per-operation bound; an operation without a known bound is an error
that names it, never a silent 1.

What is guaranteed (``LipschitzReport.guaranteed``):

- ``method="fft"`` (default): Linear layers by their exact spectral norm; convolutions
  by the exact norm of a circular convolution on a zero-padded grid, which provably
  dominates the zero-padded (and strided) convolution (:func:`fft_conv_bound`); LMT's
  closed form for grouped convolutions. Proven, tight, and fast (preact_resnet18 in
  seconds on a CPU).
- ``method="exact"``: Linear layers by SVD; convolutions by the SVD of their dense
  matrix at the actual input shape (small inputs only). Every factor is an upper bound
  up to floating-point rounding.
- ``method="lmt"``: Linear by SVD, convolutions by LMT's closed form
  ``sigma_max(W reshaped) * sqrt(overlap)``: provable, looser.
- ``method="power"``: power iteration with conv and its transpose at the actual input
  shape, accelerated by Lanczos bidiagonalisation, until the Ritz residual is below
  ``tol`` times the estimate. The estimate is always a *lower* bound of the norm; it is
  an upper bound only once it has converged to the top singular value, which a random
  start reaches with probability one but not with proof. The reported bound multiplies
  the estimate by ``1 + margin``; a layer that did not converge is flagged
  (``converged`` False). A power-iteration report is never ``guaranteed``; certificates
  meant as proofs should use ``fft``, ``exact`` or ``lmt`` (the tests check ``power``
  against them).

Pooling, activation and normalisation bounds are exact or provable in every method.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from robustlab.errors import RobustlabError
from robustlab.models.layers import Normalize
from robustlab.nn.activations import MaxMin, ParametricSoftplus, SmoothGradReLU, SmoothReLU

METHODS = ("power", "fft", "exact", "lmt")


class LipschitzError(RobustlabError, ValueError):
    """A model (or one of its operations) that cannot be bounded."""


@dataclass
class LayerBound:
    """The bound of one operation of the graph."""

    node: str  #: fx node name
    op: str  #: what it is (``Conv2d``, ``relu``, ``add``...)
    bound: float  #: its L2 Lipschitz constant (upper bound)
    method: str  #: how it was computed (``power``, ``svd``, ``lmt``, ``exact``, ``closed-form``)
    converged: bool = True  #: power iteration converged (always True for other methods)
    lmt: float | None = None  #: LMT's closed-form bound of the same layer, for comparison


@dataclass
class LipschitzReport:
    """Total bound and the per-operation breakdown."""

    total: float
    layers: list[LayerBound]
    input_shape: tuple[int, ...]
    method: str
    guaranteed: bool  #: every factor is a proven upper bound (methods fft, exact and lmt)
    converged: bool  #: every power iteration converged (always True for exact and lmt)
    node_bounds: dict[str, float] = field(default_factory=dict, repr=False)

    def table(self) -> str:
        lines = [f"L2 Lipschitz bound {self.total:.6g} ({self.method}, input {self.input_shape})"]
        for layer in self.layers:
            if layer.bound == 1.0 and layer.method == "closed-form":
                continue
            extra = f"  lmt {layer.lmt:.4g}" if layer.lmt is not None else ""
            flag = "" if layer.converged else "  NOT CONVERGED"
            head = f"  {layer.node:<24} {layer.op:<16} {layer.bound:10.4g}"
            lines.append(f"{head}  {layer.method}{extra}{flag}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- activations


def max_slope(fn, lo: float = -20.0, hi: float = 20.0, points: int = 400_001) -> float:
    """The largest |derivative| of an elementwise function, computed on a fine float64 grid.

    Used for smooth activations whose bound is not 1 (SiLU about 1.0998, GELU about
    1.1289). Outside [lo, hi] these functions are linear or constant to double precision.
    A relative margin of 1e-6 covers the grid's discretisation.
    """
    x = torch.linspace(lo, hi, points, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return float(g.abs().max()) * (1 + 1e-6)


_SLOPE_CACHE: dict[Any, float] = {}


def _cached_slope(key: Any, fn) -> float:
    if key not in _SLOPE_CACHE:
        _SLOPE_CACHE[key] = max_slope(fn)
    return _SLOPE_CACHE[key]


def activation_bound(m: nn.Module) -> float | None:
    """Lipschitz constant of an activation module, or None if ``m`` is not one."""
    if isinstance(m, (nn.ReLU, nn.ReLU6, nn.Softplus, nn.Tanh, nn.Hardtanh, SmoothReLU,
                      SmoothGradReLU, ParametricSoftplus, nn.Identity)):  # fmt: skip
        return 1.0  # derivatives in [0, 1]
    if isinstance(m, MaxMin):
        return 1.0  # a permutation of its input on every linear piece
    if isinstance(m, nn.Sigmoid):
        return 0.25
    if isinstance(m, nn.LeakyReLU):
        return max(1.0, abs(m.negative_slope))
    if isinstance(m, nn.ELU):
        return max(1.0, abs(m.alpha))
    if isinstance(m, nn.SiLU):
        return _cached_slope("silu", F.silu)
    if isinstance(m, nn.GELU):
        return _cached_slope(
            ("gelu", m.approximate), lambda x: F.gelu(x, approximate=m.approximate)
        )
    if isinstance(m, nn.Mish):
        return _cached_slope("mish", F.mish)
    return None


_FUNCTION_SLOPES = {
    F.relu: 1.0, torch.relu: 1.0, F.relu6: 1.0, torch.tanh: 1.0, F.tanh: 1.0,
    F.softplus: 1.0, torch.sigmoid: 0.25, F.sigmoid: 0.25,
}  # fmt: skip
_IDENTITY_FUNCTIONS = {torch.flatten, F.dropout, torch.reshape}
_IDENTITY_METHODS = {"view", "reshape", "flatten", "contiguous", "relu", "relu_", "clone",
                     "permute", "transpose", "squeeze", "unsqueeze", "float"}  # fmt: skip


# ----------------------------------------------------------------------------- linear maps


def _power_iteration(
    apply, apply_t, shape, iters: int, tol: float, generator, dtype=torch.float32
) -> tuple[float, bool]:
    """Estimate the top singular value of the linear map ``apply`` (adjoint ``apply_t``)
    from below, and whether the estimate converged within ``iters`` products.

    Power iteration accelerated by Lanczos bidiagonalisation (Golub & Kahan 1965): the
    ``k`` products span the Krylov space that contains the power iterate after ``k``
    steps, so the estimate (the top singular value of the small bidiagonal matrix) is
    never below power iteration's and is still a lower bound of the true norm; it
    converges in tens of products where plain power iteration needs hundreds when the
    top singular values are clustered (random or trained convolutions). Converged: the
    Ritz pair's residual ``beta_k |p_k|`` (p: the bidiagonal's top left singular vector)
    is below ``tol`` times the estimate, i.e. some
    singular value lies within that distance (it is the largest with probability one
    from a random start, not with proof: hence the margin and the flag upstream).
    Both Krylov bases are fully re-orthogonalised.
    """
    v = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    vs: list[torch.Tensor] = [v / v.norm()]
    us: list[torch.Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []
    sigma, converged = 0.0, False
    for k in range(1, iters + 1):
        u = apply(vs[-1])
        if us:
            u = u - betas[-1] * us[-1]
            for w in us:  # full re-orthogonalisation
                u = u - (w * u).sum() * w
        alpha = float(u.norm())
        if alpha <= 1e-30:  # the Krylov space is exhausted: the estimate is exact
            converged = True
            break
        us.append(u / alpha)
        alphas.append(alpha)
        v = apply_t(us[-1]) - alpha * vs[-1]
        for w in vs:
            v = v - (w * v).sum() * w
        beta = float(v.norm())
        bidiag = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if k > 1:
            bidiag += torch.diag(torch.tensor(betas, dtype=torch.float64), 1)
        left, svals, _ = torch.linalg.svd(bidiag)
        sigma = float(svals[0])
        residual = beta * abs(float(left[-1, 0]))  # ||A^T U p - sigma V q||, the Ritz pair
        if residual <= tol * sigma or beta <= 1e-30:
            converged = True
            break
        betas.append(beta)
        vs.append(v / beta)
    return sigma, converged


def _conv_ops(
    conv: nn.Conv2d, weight: torch.Tensor, in_shape: tuple[int, ...], dtype=torch.float32
):
    """conv (no bias) and its adjoint at a (1, C, H, W) input shape."""
    if conv.padding_mode != "zeros":
        raise LipschitzError(f"padding_mode={conv.padding_mode!r} is not supported (zeros only)")
    w = weight.detach().to(dtype)
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    x0 = torch.zeros(1, *in_shape[1:], dtype=dtype, device=w.device)
    out_shape = F.conv2d(x0, w, **kw).shape

    def apply(v):
        return F.conv2d(v, w, **kw)

    if isinstance(conv.padding, str):  # asymmetric 'same' padding: the adjoint by autograd

        def apply_t(u):
            x = x0.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.conv2d(x, w, **kw), x, u)
            return g

        return apply, apply_t, out_shape
    extra = [
        size - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
        for size, o, s, p, d, k in zip(
            in_shape[-2:], out_shape[-2:], conv.stride, conv.padding, conv.dilation,
            conv.kernel_size,
        )
    ]  # fmt: skip

    def apply_t(u):  # the adjoint of a strided, padded convolution
        return F.conv_transpose2d(u, w, output_padding=tuple(extra), **kw)

    return apply, apply_t, out_shape


def spectral_norm(matrix: torch.Tensor) -> float:
    """The largest singular value of a real 2-D matrix, exactly (float64).

    The top eigenvalue of the smaller Gram matrix: as exact as an SVD (double precision,
    rounding far below the 1e-9 relative margin added) and several times faster for wide matrices.
    """
    a = matrix.detach().double()
    gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt()) * (1 + 1e-9)


def lmt_conv_bound(conv: nn.Conv2d, weight: torch.Tensor, in_shape: tuple[int, ...]) -> float:
    """LMT's closed form: sigma_max(W as C_out x (C_in kh kw)) * sqrt(max input reuse)."""
    if isinstance(conv.padding, str):
        raise LipschitzError("LMT's closed form needs numeric padding")
    h, w = in_shape[-2:]
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    dh, dw = conv.dilation
    kh_eff, kw_eff = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    reuse_h = math.ceil(min(kh, h + 2 * ph - kh_eff + 1) / sh) if dh == 1 else kh
    reuse_w = math.ceil(min(kw, w + 2 * pw - kw_eff + 1) / sw) if dw == 1 else kw
    sigma = spectral_norm(weight.flatten(1))
    if conv.groups > 1:  # block-diagonal over groups: the largest block's norm
        sigma = max(spectral_norm(b.flatten(1)) for b in weight.chunk(conv.groups, 0))
    return sigma * math.sqrt(max(1, reuse_h) * max(1, reuse_w))


def fft_conv_bound(conv: nn.Conv2d, weight: torch.Tensor, in_shape: tuple[int, ...]) -> float:
    """A proven upper bound on a zero-padded convolution's operator norm, computed exactly.

    Embed the input in an (H + p) x (W + p) grid of zeros, at offset p: the convolution
    equals a CIRCULAR convolution on that grid followed by keeping the valid (and strided)
    outputs. Output positions read padded positions 0 .. H + 2p - 1; those past the grid's
    edge wrap to 0 .. p - 1, which hold zeros, as the padding they stand for does (so
    H + p suffices; H + 2p would hold the whole padded input). The embedding is an
    isometry and keeping outputs a projection, so the norm is at most the circular
    convolution's, whose singular values are those of the C_out x C_in matrices of the
    kernel's 2-D discrete Fourier transform, one per frequency (Sedghi, Gupta & Long,
    ICLR 2019).

    The largest of them is found without a full eigen-decomposition per frequency
    (:func:`_max_spectral_norm`); a 1x1 kernel is a single matrix at every frequency.
    """
    if conv.groups != 1 or isinstance(conv.padding, str):
        raise LipschitzError("the fft bound needs groups=1 and numeric padding")
    h, w = in_shape[-2:]
    (ph, pw), (dh, dw) = conv.padding, conv.dilation
    kh, kw = conv.kernel_size
    if dh * (kh - 1) + 1 > h + 2 * ph or dw * (kw - 1) + 1 > w + 2 * pw:
        raise LipschitzError("the kernel is larger than the padded input")
    grid_h, grid_w = h + ph, w + pw
    weight = weight.detach().double().cpu()
    if kh == kw == 1:
        return spectral_norm(weight[:, :, 0, 0])

    # the kernel's DFT on the grid from its few nonzero taps, as one real matrix product,
    # at one frequency of each conjugate pair (u, v) ~ (-u, -v): a real kernel's spectrum
    # is conjugate-symmetric, so the pair has the same singular values
    u, v = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64),
        torch.arange(grid_w // 2 + 1, dtype=torch.float64),
        indexing="ij",
    )
    u, v = u.flatten(), v.flatten()
    self_paired = (v == 0) | (2 * v == grid_w)  # columns whose conjugates are themselves
    keep = ~self_paired | (u <= (grid_h - u) % grid_h)
    u, v = u[keep], v[keep]
    rows = torch.arange(kh, dtype=torch.float64).repeat_interleave(kw) * dh  # per tap
    cols = torch.arange(kw, dtype=torch.float64).repeat(kh) * dw
    angle = 2 * math.pi * (u[:, None] * rows / grid_h + v[:, None] * cols / grid_w)
    taps = weight.flatten(2).flatten(0, 1).T.float()  # taps x (C_out C_in)
    cos, sin = torch.cos(angle).float(), torch.sin(angle).float()
    spectrum = torch.complex(cos @ taps, -(sin @ taps))  # frequencies x (C_out C_in)
    return _max_spectral_norm(spectrum.reshape(-1, *weight.shape[:2]))


def _in_parallel(jobs: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Run independent jobs on ``torch.get_num_threads()`` Python threads, each with one
    torch thread (the caller's setting is restored afterwards). Results by key."""
    threads = torch.get_num_threads()
    if threads <= 1 or len(jobs) <= 1:
        return {k: job() for k, job in jobs.items()}

    def run(job: Callable[[], float]) -> float:
        torch.set_num_threads(1)  # per worker thread (OpenMP settings are per thread)
        return job()

    try:
        with ThreadPoolExecutor(threads) as pool:
            return dict(zip(jobs, pool.map(run, jobs.values())))
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _one_thread():
    """Batched small eigen- and Cholesky factorisations run several times faster on one
    thread than on several on a CPU (measured with torch 2.13: 153 eigvalsh of 128 x 128
    take 1.36 s with 2 threads, 0.13 s with 1), the threads contending inside each small
    problem. The caller's thread count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _max_spectral_norm(matrices: torch.Tensor) -> float:
    """A proven upper bound on the largest singular value of a batch of complex matrices,
    within a relative 1e-4 or so of it.

    Eight power-iteration steps on every ``A_f^H A_f`` give lower estimates of each
    ``lambda_max``. If they have settled, their maximum times ``1 + rel`` is a candidate
    t, and a Cholesky factorisation of ``t I - G_f`` succeeding for every f proves
    ``lambda_max(G_f) < t`` (a Hermitian matrix is positive definite iff it has one);
    G and the factorisation are in double precision, whose rounding (at most about
    ``n^2 2^-53`` relative) the final ``1 + rel`` factor covers many times over.
    Otherwise (clustered top singular values, as random weights have), or where a
    factorisation fails, an eigenvalue solver gives the frequencies' values, in single
    precision: its backward error and the Gram's forward error are each about
    ``n 2^-24 ||G||``, below ``rel = max(1e-4, 8 n 2^-24)``.
    """
    a = matrices.to(torch.complex64).contiguous()  # strided batches multiply slowly
    small = min(a.shape[-2:])
    rel = max(1e-4, 8 * max(a.shape[-2:]) * 2.0**-24)
    v = torch.randn(a.shape[0], a.shape[-1], 1, generator=torch.Generator().manual_seed(0))
    v = v.to(a.dtype) / v.norm(dim=1, keepdim=True)
    estimates, ah = [], a.mH.resolve_conj()  # a materialised conjugate: 5x faster products
    for _ in range(8):  # v <- A^H A v, without forming the Gram matrices
        v = ah @ (a @ v)
        estimates.append(float(v.norm(dim=1).max()))  # ||G v||, v unit: <= lambda_max
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    t = max(estimates[-1], 1e-30) * (1 + rel)
    failed = torch.ones(a.shape[0], dtype=torch.bool)
    if estimates[-1] - estimates[-2] <= 0.1 * rel * estimates[-1]:  # settled: worth a proof
        a64 = matrices.to(torch.complex128)
        gram = a64.mH @ a64 if a64.shape[-1] <= a64.shape[-2] else a64 @ a64.mH
        eye = torch.eye(small, dtype=gram.dtype)
        with _one_thread():
            failed = torch.linalg.cholesky_ex(t * eye - gram).info != 0
    if bool(failed.any()):
        sub = a[failed]
        gram = sub.mH @ sub if sub.shape[-1] <= sub.shape[-2] else sub @ sub.mH
        with _one_thread():
            top = float(torch.linalg.eigvalsh(gram)[:, -1].max())
        t = max(t, top * (1 + rel))
    return math.sqrt(t * (1 + rel))


def dense_matrix(apply, in_shape: tuple[int, ...]) -> torch.Tensor:
    """The dense matrix of a linear map on inputs of ``in_shape`` (small shapes only)."""
    n = math.prod(in_shape[1:])
    eye = torch.eye(n, dtype=torch.float64).view(n, *in_shape[1:])
    return apply(eye).reshape(n, -1).T


# ----------------------------------------------------------------------------- graph walk


def propagate_shapes(gm: fx.GraphModule, x: torch.Tensor) -> None:
    """Run ``gm`` on ``x`` and record each node's output shape in ``node.meta["shape"]``
    (None for non-tensor values). Lighter than ``torch.fx``'s ShapeProp, whose import
    alone costs about a second."""

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            n.meta["shape"] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
            return out

    try:
        with torch.no_grad():
            _Recorder(gm).run(x)
    except Exception as exc:
        raise LipschitzError(
            f"the model does not run on an input of shape {tuple(x.shape)}: {exc}"
        ) from exc


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (Normalize, SmoothReLU, SmoothGradReLU, ParametricSoftplus, MaxMin)):
            return True
        return super().is_leaf_module(m, qualname)


def _bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    if bn.training or bn.running_var is None:
        raise LipschitzError(
            f"batch norm {bn} must be in eval mode with running statistics to be bounded"
        )
    scale = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    return scale


def lipschitz_bound(
    model: nn.Module,
    input_shape: tuple[int, ...] | list[int],
    *,
    method: str = "fft",
    iters: int = 300,
    tol: float = 1e-3,
    margin: float = 1e-2,
    fold_bn: bool = True,
    seed: int = 0,
    compare_lmt: bool = False,
) -> LipschitzReport:
    """An upper bound on the L2 Lipschitz constant of ``model`` (in eval mode).

    Args:
        model: any module torch.fx can trace (zoo models, user models with modules or
            functional calls: ``F.relu``, ``F.avg_pool2d``, ``torch.flatten``, ``x.view``, ``+``).
        input_shape: the shape of ONE input, with or without the batch dimension
            (convolution norms depend on it).
        method: ``"fft"`` (default), ``"exact"``, ``"lmt"`` (proven) or ``"power"`` (an
            estimate); see the module docstring.
        iters, tol: budget of products and convergence tolerance of the ``power`` method
            (Lanczos-accelerated power iteration; converged when the Ritz residual is
            below ``tol`` times the estimate, which puts the estimate itself far closer:
            1e-3 gives per-layer values within ~1e-4 of full convergence on
            preact_resnet18, well inside ``margin``).
        margin: relative safety margin on power-iteration estimates.
        fold_bn: fold a batch norm into the convolution or linear layer it directly
            follows (their product's norm, tighter than the product of norms).
        seed: seed of the power-iteration start vectors.
        compare_lmt: also compute LMT's closed-form bound of every convolution
            (``LayerBound.lmt``), for comparison.

    Raises:
        LipschitzError: an operation has no known bound (it is named), the model cannot
            be traced, or a batch norm is in training mode.

    Example:
        >>> report = lipschitz_bound(model.eval(), (1, 28, 28))
        >>> report.total, print(report.table())
    """
    if method not in METHODS:
        raise LipschitzError(f"method must be one of {METHODS}, got {method!r}")
    shape = tuple(input_shape)
    if len(shape) in (1, 3):
        shape = (1, *shape)
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:
        raise LipschitzError(f"torch.fx could not trace the model: {exc}") from exc
    gm = fx.GraphModule(model, graph)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    modes = {m: m.training for m in model.modules()}
    model.eval()  # the bound is that of the inference function; nothing may move BN stats
    try:
        propagate_shapes(gm.eval(), torch.zeros(shape, device=device))
        return _walk(gm, shape, method, iters, tol, margin, fold_bn, seed, compare_lmt)
    finally:
        for m, mode in modes.items():
            m.training = mode


def _walk(gm, shape, method, iters, tol, margin, fold_bn, seed, compare_lmt) -> LipschitzReport:
    generator = torch.Generator().manual_seed(seed)
    modules = dict(gm.named_modules())
    bound: dict[str, float] = {}
    layers: list[LayerBound] = []
    folded: set[str] = set()  # batch-norm nodes already folded into their layer

    def shape_of(node: fx.Node) -> tuple[int, ...]:
        return node.meta["shape"]

    def is_tensor(a: Any) -> bool:
        return isinstance(a, fx.Node) and a.name in bound

    def folded_weight(node: fx.Node, m: nn.Module) -> tuple[torch.Tensor, fx.Node | None]:
        """The layer's weight, times the batch norm that directly follows it (if folding)."""
        weight = m.weight.detach().double()
        users = list(node.users)
        if fold_bn and len(users) == 1 and users[0].op == "call_module":
            nxt = modules[users[0].target]
            if isinstance(nxt, nn.modules.batchnorm._BatchNorm) and not nxt.training:
                scale = _bn_scale(nxt)
                return weight * scale.view(-1, *([1] * (weight.ndim - 1))), users[0]
        return weight, None

    # the fft bounds of all convolutions at once, in parallel: independent, and each made
    # of many small factorisations that run best one thread each
    fft_jobs = {
        node.name: (modules[node.target], folded_weight(node, modules[node.target])[0],
                    shape_of(node.args[0]))
        for node in gm.graph.nodes
        if method == "fft" and node.op == "call_module"
        and isinstance(modules[node.target], nn.Conv2d)
        and modules[node.target].groups == 1 and not isinstance(modules[node.target].padding, str)
    }  # fmt: skip
    fft_bounds = _in_parallel({k: partial(fft_conv_bound, *job) for k, job in fft_jobs.items()})

    def linear_layer(node: fx.Node, m: nn.Module) -> LayerBound:
        weight, bn_node = folded_weight(node, m)
        name = type(m).__name__ + ("+BN" if bn_node is not None else "")
        if isinstance(m, nn.Linear):
            if method == "power":
                sigma, ok = _power_iteration(
                    lambda v: weight @ v,
                    lambda u: weight.T @ u,
                    (weight.shape[1],),
                    iters,
                    tol,
                    generator,
                    torch.float64,
                )
                result = LayerBound(node.name, name, sigma * (1 + margin), "power", ok)
            else:
                result = LayerBound(node.name, name, spectral_norm(weight), "svd")
        else:  # Conv2d
            in_shape = shape_of(node.args[0])
            lmt = lmt_conv_bound(m, weight, in_shape) if method == "lmt" or compare_lmt else None
            if method == "power":
                apply, apply_t, _ = _conv_ops(m, weight, in_shape, torch.float32)
                sigma, ok = _power_iteration(
                    apply, apply_t, (1, *in_shape[1:]), iters, tol, generator
                )
                result = LayerBound(node.name, name, sigma * (1 + margin), "power", ok, lmt)
            elif method == "lmt":
                result = LayerBound(node.name, name, lmt, "lmt", True, lmt)  # type: ignore[arg-type]
            elif node.name in fft_bounds:
                result = LayerBound(node.name, name, fft_bounds[node.name], "fft", True, lmt)
            elif method == "fft":  # grouped or string-padded convolutions
                closed = lmt_conv_bound(m, weight, in_shape)
                result = LayerBound(node.name, name, closed, "lmt", True, closed)
            else:
                apply, _, out_shape = _conv_ops(m, weight, in_shape, torch.float64)
                n_in, n_out = math.prod(in_shape[1:]), math.prod(out_shape)
                if n_in * n_out > 25_000_000:
                    raise LipschitzError(
                        f"method='exact' builds the dense {n_out}x{n_in} matrix of {node.name}: "
                        "too large; use 'power' or 'lmt'"
                    )
                matrix = dense_matrix(apply, (1, *in_shape[1:]))
                result = LayerBound(node.name, name, spectral_norm(matrix), "exact", True, lmt)
        if bn_node is not None:
            folded.add(bn_node.name)
        return result

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            bound[node.name] = 1.0
            continue
        if node.op == "output":
            out = node.args[0]
            if not is_tensor(out):
                raise LipschitzError("the model's output must be a single tensor")
            total = bound[out.name]
            break
        if node.op == "get_attr":
            continue  # constants: Lipschitz constant 0 as functions of the input
        tensor_args = [a for a in node.args if is_tensor(a)]
        if not tensor_args and not any(is_tensor(v) for v in node.kwargs.values()):
            continue  # shape arithmetic and constants
        if node.meta.get("shape") is None:
            continue  # non-tensor results (x.size(), x.shape[0])
        src = bound[tensor_args[0].name] if tensor_args else 0.0
        layer: LayerBound | None = None
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                layer = linear_layer(node, m)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                if node.name in folded:
                    bound[node.name] = src
                    continue
                layer = LayerBound(
                    node.name, type(m).__name__, float(_bn_scale(m).abs().max()), "closed-form"
                )
            elif isinstance(m, Normalize):
                layer = LayerBound(node.name, "Normalize", float(1.0 / m.std.min()), "closed-form")
            elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
                layer = LayerBound(
                    node.name,
                    type(m).__name__,
                    _pool_bound(m, shape_of(tensor_args[0])),
                    "closed-form",
                )
            elif isinstance(m, nn.AdaptiveAvgPool2d):
                layer = LayerBound(
                    node.name,
                    "AdaptiveAvgPool2d",
                    _adaptive_avg_bound(m.output_size, shape_of(tensor_args[0])),
                    "closed-form",
                )
            elif isinstance(m, (nn.Flatten, nn.Dropout, nn.Identity, nn.Unflatten)):
                layer = LayerBound(node.name, type(m).__name__, 1.0, "closed-form")
            else:
                slope = activation_bound(m)
                if slope is None:
                    raise LipschitzError(
                        f"no Lipschitz bound known for module {node.target!r} ({type(m).__name__})"
                    )
                layer = LayerBound(node.name, type(m).__name__, slope, "closed-form")
            bound[node.name] = src * layer.bound
        elif node.op == "call_function":
            fn = node.target
            if fn in (operator.add, torch.add, operator.sub, torch.sub):
                bound[node.name] = sum(bound[a.name] for a in tensor_args)
                layer = LayerBound(node.name, fn.__name__, 1.0, "closed-form")
            elif fn in (operator.mul, torch.mul, operator.truediv, torch.div):
                if len(tensor_args) != 1:
                    raise LipschitzError(
                        f"{node.name}: a product of two tensors has no global bound"
                    )
                const = node.args[1] if is_tensor(node.args[0]) else node.args[0]
                divide = fn in (operator.truediv, torch.div)
                if divide and not is_tensor(node.args[0]):
                    raise LipschitzError(f"{node.name}: division by the input has no bound")
                if isinstance(const, fx.Node) and const.op == "get_attr":  # a stored tensor
                    value: Any = gm
                    for part in const.target.split("."):
                        value = getattr(value, part)
                    const = value
                if isinstance(const, torch.Tensor):
                    mag = const.detach().abs().double()
                    c = float(1.0 / mag.min()) if divide else float(mag.max())
                elif isinstance(const, (int, float)):
                    c = 1.0 / abs(const) if divide else abs(const)
                else:
                    raise LipschitzError(
                        f"{node.name}: {fn.__name__} by a non-constant has no known bound"
                    )
                bound[node.name] = src * c
                layer = LayerBound(node.name, fn.__name__, c, "closed-form")
            elif fn is torch.cat:
                parts = [bound[a.name] for a in node.args[0] if is_tensor(a)]
                bound[node.name] = math.sqrt(sum(p * p for p in parts))
                layer = LayerBound(node.name, "cat", 1.0, "closed-form")
            elif fn in _FUNCTION_SLOPES:
                bound[node.name] = src * _FUNCTION_SLOPES[fn]
                layer = LayerBound(node.name, fn.__name__, _FUNCTION_SLOPES[fn], "closed-form")
            elif fn in (F.silu, F.gelu, F.elu, F.leaky_relu):
                mod = _functional_activation(fn, node)
                slope = activation_bound(mod)
                bound[node.name] = src * slope
                layer = LayerBound(node.name, fn.__name__, slope, "closed-form")
            elif fn in (F.max_pool2d, F.avg_pool2d):
                pool = _functional_pool(fn, node)
                b = _pool_bound(pool, shape_of(tensor_args[0]))
                bound[node.name] = src * b
                layer = LayerBound(node.name, fn.__name__, b, "closed-form")
            elif fn is F.adaptive_avg_pool2d:
                b = _adaptive_avg_bound(node.args[1], shape_of(tensor_args[0]))
                bound[node.name] = src * b
                layer = LayerBound(node.name, fn.__name__, b, "closed-form")
            elif fn in _IDENTITY_FUNCTIONS:
                bound[node.name] = src
                layer = LayerBound(node.name, getattr(fn, "__name__", str(fn)), 1.0, "closed-form")
            elif fn in (operator.neg, torch.neg):
                bound[node.name] = src
                layer = LayerBound(node.name, "neg", 1.0, "closed-form")
            else:
                raise LipschitzError(
                    f"no Lipschitz bound known for the call {getattr(fn, '__name__', fn)} "
                    f"(node {node.name!r})"
                )
        elif node.op == "call_method":
            if node.target in _IDENTITY_METHODS:
                bound[node.name] = src
                layer = LayerBound(node.name, node.target, 1.0, "closed-form")
            else:
                raise LipschitzError(
                    f"no Lipschitz bound known for the method .{node.target}() (node {node.name!r})"
                )
        if layer is not None:
            layers.append(layer)
    else:  # pragma: no cover - every graph ends with an output node
        raise LipschitzError("the traced graph has no output")
    converged = all(layer.converged for layer in layers)
    return LipschitzReport(total, layers, shape, method, method != "power", converged, bound)


def _functional_activation(fn, node: fx.Node) -> nn.Module:
    def arg(i: int, name: str, default: Any) -> Any:
        return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)

    if fn is F.silu:
        return nn.SiLU()
    if fn is F.gelu:
        return nn.GELU(approximate=node.kwargs.get("approximate", "none"))
    if fn is F.elu:
        return nn.ELU(arg(1, "alpha", 1.0))
    return nn.LeakyReLU(arg(1, "negative_slope", 0.01))


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def _functional_pool(fn, node: fx.Node) -> nn.Module:
    names = ["kernel_size", "stride", "padding"]
    kwargs = {n: node.args[i + 1] for i, n in enumerate(names) if len(node.args) > i + 1}
    kwargs.update(
        {
            k: v
            for k, v in node.kwargs.items()
            if k in (*names, "ceil_mode", "count_include_pad", "dilation")
        }
    )
    if kwargs.get("stride") in (None, []):
        kwargs.pop("stride", None)
    return (nn.MaxPool2d if fn is F.max_pool2d else nn.AvgPool2d)(**kwargs)


def _pool_bound(m: nn.Module, in_shape: tuple[int, ...]) -> float:
    """Max pooling: sqrt(n); average pooling: sqrt(n / (kh kw)); n = windows sharing a pixel."""
    kh, kw = _pair(m.kernel_size)
    sh, sw = _pair(m.stride if m.stride is not None else m.kernel_size)
    dil = _pair(getattr(m, "dilation", 1))
    h, w = in_shape[-2:]
    ph, pw = _pair(m.padding)
    reuse = math.ceil(min(kh, h + 2 * ph - kh + 1) / sh) * math.ceil(
        min(kw, w + 2 * pw - kw + 1) / sw
    )
    if dil != (1, 1):
        reuse = kh * kw
    reuse = max(1, reuse)
    if isinstance(m, nn.MaxPool2d):
        return math.sqrt(reuse)
    if (not m.count_include_pad and (ph or pw)) or m.divisor_override:
        raise LipschitzError("average pooling without padding in the count is not supported")
    return math.sqrt(reuse / (kh * kw))


def _adaptive_avg_bound(output_size: Any, in_shape: tuple[int, ...]) -> float:
    oh, ow = _pair(output_size)
    h, w = in_shape[-2:]
    oh, ow = oh or h, ow or w
    if h % oh or w % ow:
        raise LipschitzError(f"adaptive average pooling {h}x{w} -> {oh}x{ow}: uneven windows")
    return 1.0 / math.sqrt((h // oh) * (w // ow))
