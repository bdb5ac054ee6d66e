"""Upper bounds on a network's L2 Lipschitz constant, by walking its torch.fx graph.

Tsuzuku, Sato & Sugiyama (NeurIPS 2018): a composition's constant is at most the product
of its parts', a sum's at most the sum of its branches'. Each operation of the traced
graph contributes a per-operation bound; an operation without a known bound is an error
that names it, never a silent 1.

What is guaranteed (``LipschitzReport.guaranteed``):

- ``method="fft"`` (default): Linear layers by their exact spectral norm; convolutions
  by the exact norm of a circular convolution on a zero-padded grid, which provably
  dominates the zero-padded (strided, dilated, ``"same"``-padded) convolution
  (:func:`fft_conv_bound`); LMT's closed form for grouped convolutions. Proven, tight,
  and fast (preact_resnet18 in seconds on a CPU).
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

The per-operation bounds are a table of rules (:class:`Rule`: ``MODULE_RULES`` by module
class, ``FUNCTION_RULES`` by function, ``METHOD_RULES`` by tensor method name), each
registered once with :func:`rule`; the report's walk (:func:`lipschitz_bound`) and the
differentiable training tracker (:class:`~robustlab.certify.training.LipschitzTracker`)
both run them through :func:`propagate`.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from robustlab.errors import RobustlabError
from robustlab.models.layers import Normalize
from robustlab.nn.activations import MaxMin, ParametricSoftplus, SmoothGradReLU, SmoothReLU
from robustlab.nn.adapt import OutputSpec, as_classifier, check_logits, preserve_modes

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
    #: what was bounded, in words (certify's last-layer form bounds a sub-network)
    subject: str = "the whole network (input to output)"

    @property
    def quantity(self) -> str:
        """What ``total`` is, in words: a proven bound, or an estimate."""
        if self.guaranteed:
            return f"L2 Lipschitz bound of {self.subject}"
        return (
            f"estimated L2 Lipschitz constant of {self.subject} "
            f"({self.method} iteration: an estimate, not a guarantee)"
        )

    def table(self) -> str:
        proof = "proven upper bound" if self.guaranteed else "estimate"
        head = f"{self.quantity}: {self.total:.6g}"
        lines = [f"{head} [{self.method}: {proof}; input {self.input_shape}]"]
        for layer in self.layers:
            if layer.bound == 1.0 and layer.method == "closed-form":
                continue
            extra = f"  lmt {layer.lmt:.4g}" if layer.lmt is not None else ""
            flag = "" if layer.converged else "  NOT CONVERGED"
            head = f"  {layer.node:<24} {layer.op:<16} {layer.bound:10.4g}"
            lines.append(f"{head}  {layer.method}{extra}{flag}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: ``l2_lipschitz`` is a proven upper bound only where
        ``guaranteed`` is true (``quantity`` says which in words)."""
        return {
            "quantity": self.quantity,
            "subject": self.subject,
            "l2_lipschitz": self.total,
            "method": self.method,
            "guaranteed": self.guaranteed,
            "converged": self.converged,
            "input_shape": list(self.input_shape),
            "layers": [asdict(layer) for layer in self.layers],
        }


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


def _by_type(table: dict[type, Any], m: nn.Module) -> Any:
    """The entry of ``m``'s class or of its nearest base class in ``table`` (None if none)."""
    for cls in type(m).__mro__:
        if cls in table:
            return table[cls]
    return None


def _unit(m: nn.Module) -> float:
    return 1.0


#: activation module -> its Lipschitz constant (the largest |derivative|)
_ACTIVATIONS: dict[type, Callable[[Any], float]] = {
    # derivatives in [0, 1]
    **dict.fromkeys((nn.ReLU, nn.ReLU6, nn.Softplus, nn.Tanh, nn.Hardtanh, SmoothReLU,
                     SmoothGradReLU, ParametricSoftplus, nn.Identity), _unit),
    MaxMin: _unit,  # a permutation of its input on every linear piece
    nn.Sigmoid: lambda m: 0.25,
    nn.LeakyReLU: lambda m: max(1.0, abs(m.negative_slope)),
    nn.ELU: lambda m: max(1.0, abs(m.alpha)),
    nn.SiLU: lambda m: _cached_slope("silu", F.silu),
    nn.GELU: lambda m: _cached_slope(
        ("gelu", m.approximate), lambda x: F.gelu(x, approximate=m.approximate)
    ),
    nn.Mish: lambda m: _cached_slope("mish", F.mish),
}  # fmt: skip


def activation_bound(m: nn.Module) -> float | None:
    """Lipschitz constant of an activation module, or None if ``m`` is not one."""
    slope = _by_type(_ACTIVATIONS, m)
    return None if slope is None else slope(m)


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


def _symmetric_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """The padding per side of a convolution whose outputs include the given one's.

    Numeric padding is itself; ``"valid"`` is 0. ``"same"`` (stride 1) pads ``d (k - 1)``
    in all, the odd one on the right: padding ``ceil(d (k - 1) / 2)`` on both sides
    instead computes the same windows, and more, so the ``"same"`` map is a projection of
    that convolution and its norm at most that one's.
    """
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        pad = [math.ceil(d * (k - 1) / 2) for k, d in zip(conv.kernel_size, conv.dilation)]
        return pad[0], pad[1]
    return conv.padding  # type: ignore[return-value]


def lmt_conv_bound(conv: nn.Conv2d, weight: torch.Tensor, in_shape: tuple[int, ...]) -> float:
    """LMT's closed form: sigma_max(W as C_out x (C_in kh kw)) * sqrt(max input reuse)."""
    h, w = in_shape[-2:]
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, _symmetric_padding(conv)
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
    ``"same"`` padding is bounded through :func:`_symmetric_padding`.
    """
    if conv.groups != 1:
        raise LipschitzError("the fft bound needs groups=1")
    h, w = in_shape[-2:]
    (ph, pw), (dh, dw) = _symmetric_padding(conv), conv.dilation
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


def propagate_shapes(gm: fx.GraphModule, x: torch.Tensor) -> Any:
    """Run ``gm`` on ``x``, record each node's output shape in ``node.meta["shape"]``
    (None for non-tensor values) and return the output. Lighter than ``torch.fx``'s
    ShapeProp, whose import alone costs about a second."""

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            n.meta["shape"] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
            return out

    try:
        with torch.no_grad():
            return _Recorder(gm).run(x)
    except Exception as exc:
        raise LipschitzError(
            f"the model does not run on an input of shape {tuple(x.shape)}: {exc}"
        ) from exc


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (Normalize, SmoothReLU, SmoothGradReLU, ParametricSoftplus, MaxMin)):
            return True
        return super().is_leaf_module(m, qualname)


def _trace(model: nn.Module, shape: tuple[int, ...], output: OutputSpec = None) -> fx.GraphModule:
    """``model`` (already in eval mode, so that flags such as ``self.training`` are traced as
    they are at inference) traced by torch.fx, with each node's output shape recorded.

    Raises:
        OutputError: the model's output is not one tensor and ``output`` does not select one.
    """
    model = as_classifier(model, output)
    if _by_type(MODULE_RULES, model) is not None:  # a single layer: bound it as one
        model = nn.Sequential(model)
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as exc:
        raise LipschitzError(f"torch.fx could not trace the model: {exc}") from exc
    # outputs not selected by ``output`` (features, auxiliary heads) play no part in the
    # logits' Lipschitz constant: drop them rather than ask for rules they do not need
    gm.graph.eliminate_dead_code()
    gm.recompile()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = propagate_shapes(gm.eval(), torch.zeros(shape, device=device))
    if not isinstance(out, torch.Tensor):
        check_logits(out, shape[0])  # raises, saying how to select the logits
    return gm


def _bn_scale(bn: nn.modules.batchnorm._BatchNorm, differentiable: bool = False) -> torch.Tensor:
    """The per-channel scale ``gamma / sqrt(running_var + eps)`` of a batch norm at inference
    (Ioffe & Szegedy, ICML 2015), a diagonal map: its norm is the largest ``|scale|``.

    In float64 and detached (the bound; the batch norm must be in eval mode), or, when
    ``differentiable``, in the layer's dtype with gradient through ``gamma`` (the training
    tracker, which reads the running statistics in either mode).
    """
    if bn.running_var is None or (bn.training and not differentiable):
        raise LipschitzError(
            f"batch norm {bn} must be in eval mode with running statistics to be bounded"
        )
    var = bn.running_var.detach() if differentiable else bn.running_var.double()
    scale = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * (bn.weight if differentiable else bn.weight.detach().double())
    return scale


# ----------------------------------------------------------------------------- rules
#
# A rule bounds one kind of operation. Its ``factor`` is the operation's own constant (a
# LayerBound); its ``combine`` turns the bounds of the operation's tensor inputs and that
# factor into the bound of its output. ``combine`` works on floats (the report) and on 0-d
# tensors (the differentiable tracker, training.py) alike, so both walks share every rule.


def compose(bounds: list[Any], factor: Any) -> Any:
    """``f(g(x))``: ``Lip <= Lip(f) Lip(g)``, ``factor`` being ``Lip(f)``."""
    return bounds[0] * factor


def branch_sum(bounds: list[Any], factor: Any) -> Any:
    """``g(x) + h(x)`` or ``g(x) - h(x)`` (a residual sum, or ``x + x``): ``Lip <= Lip(g) +
    Lip(h)`` by the triangle inequality (Tsuzuku, Sato & Sugiyama 2018). A tensor
    used twice is listed twice."""
    total = bounds[0]
    for b in bounds[1:]:
        total = total + b
    return total


def concatenation(bounds: list[Any], factor: Any) -> Any:
    """``(g(x), h(x))`` stacked: the squared change of the whole is the sum of the parts',
    so ``Lip <= sqrt(Lip(g)^2 + Lip(h)^2)``."""
    return sum(b * b for b in bounds) ** 0.5


@dataclass(frozen=True)
class Rule:
    """How one kind of operation bounds its output from its inputs' bounds.

    ``factor(site)`` is the operation's own constant as a :class:`LayerBound`, or None
    for an operation already counted elsewhere (a batch norm folded into the layer before
    it), which then passes its input's bound through. ``combine`` is :func:`compose`,
    :func:`branch_sum` or :func:`concatenation`. ``weighted``: the factor depends on
    trained weights, and the training tracker recomputes it with gradients.
    """

    factor: Callable[[Site], LayerBound | None]
    combine: Callable[[list[Any], Any], Any] = compose
    weighted: bool = False


@dataclass
class Site:
    """One operation of the traced graph, as its rule sees it."""

    node: fx.Node
    inputs: list[fx.Node]  #: its tensor arguments in order (a tensor used twice: twice)
    module: nn.Module | None  #: the module called (call_module nodes)
    walk: _Walk  #: the method and settings, the graph

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.inputs[0].meta["shape"]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.node.meta["shape"]

    @property
    def name(self) -> str:
        if self.module is not None:
            return type(self.module).__name__
        target = self.node.target
        return target if isinstance(target, str) else getattr(target, "__name__", str(target))

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Argument ``i`` (positional) or ``name`` (keyword) of the call."""
        args = self.node.args
        return args[i] if len(args) > i else self.node.kwargs.get(name, default)

    def layer(self, bound: float, method: str = "closed-form", **extra: Any) -> LayerBound:
        return LayerBound(self.node.name, extra.pop("op", self.name), float(bound), method, **extra)


#: the rules: by module class (subclasses included), by function, by method name
MODULE_RULES: dict[type, Rule] = {}
FUNCTION_RULES: dict[Any, Rule] = {}
METHOD_RULES: dict[str, Rule] = {}


def rule(*keys: Any, combine: Callable = compose, weighted: bool = False) -> Callable:
    """Register the decorated factor function as the rule of ``keys``: module classes,
    functions (``F.relu``, ``operator.add``) or method names (``"view"``)."""

    def register(factor: Callable[[Site], LayerBound | None]) -> Callable:
        found = Rule(factor, combine, weighted)
        for key in keys:
            if isinstance(key, type):
                MODULE_RULES[key] = found
            elif isinstance(key, str):
                METHOD_RULES[key] = found
            else:
                FUNCTION_RULES[key] = found
        return factor

    return register


def rule_for(node: fx.Node, modules: dict[str, nn.Module]) -> Rule:
    """The rule of a graph node; an error naming the operation when there is none."""
    if node.op == "call_module":
        m = modules[node.target]
        found = _by_type(MODULE_RULES, m)
        if found is None:
            raise LipschitzError(
                f"no Lipschitz bound known for module {node.target!r} ({type(m).__name__})"
            )
        return found
    if node.op == "call_function":
        found = FUNCTION_RULES.get(node.target)
        if found is None:
            name = getattr(node.target, "__name__", node.target)
            raise LipschitzError(
                f"no Lipschitz bound known for the call {name} (node {node.name!r})"
            )
        return found
    if node.op == "call_method":
        found = METHOD_RULES.get(node.target)
        if found is None:
            raise LipschitzError(
                f"no Lipschitz bound known for the method .{node.target}() (node {node.name!r})"
            )
        return found
    raise LipschitzError(f"no Lipschitz bound known for node {node.name!r} ({node.op})")


# weighted layers: the method decides how their norm is computed


@rule(nn.Linear, nn.Conv2d, weighted=True)
def _weighted_layer(site: Site) -> LayerBound:
    """A linear or convolution layer (bias: no effect on the constant), folded with the batch
    norm that directly follows it, by the report's method (module docstring)."""
    walk, m, node = site.walk, site.module, site.node
    weight, folded = walk.folded_weight(node)
    name = type(m).__name__ + ("+BN" if folded else "")
    if isinstance(m, nn.Linear):
        if walk.method == "power":
            sigma, ok = _power_iteration(
                lambda v: weight @ v,
                lambda u: weight.T @ u,
                (weight.shape[1],),
                walk.iters,
                walk.tol,
                walk.generator,
                torch.float64,
            )
            return site.layer(sigma * (1 + walk.margin), "power", op=name, converged=ok)
        return site.layer(spectral_norm(weight), "svd", op=name)
    if m.padding_mode != "zeros":  # every method below assumes zero padding
        raise LipschitzError(
            f"{node.name}: padding_mode={m.padding_mode!r} is not supported (zeros only)"
        )
    in_shape = site.in_shape
    lmt = lmt_conv_bound(m, weight, in_shape) if walk.method == "lmt" or walk.compare_lmt else None
    if walk.method == "power":
        apply, apply_t, _ = _conv_ops(m, weight, in_shape, torch.float32)
        sigma, ok = _power_iteration(
            apply, apply_t, (1, *in_shape[1:]), walk.iters, walk.tol, walk.generator
        )
        return site.layer(sigma * (1 + walk.margin), "power", op=name, converged=ok, lmt=lmt)
    if walk.method == "lmt":
        return site.layer(lmt, "lmt", op=name, lmt=lmt)  # type: ignore[arg-type]
    if node.name in walk.fft_bounds:
        return site.layer(walk.fft_bounds[node.name], "fft", op=name, lmt=lmt)
    if walk.method == "fft":  # grouped convolutions
        closed = lmt_conv_bound(m, weight, in_shape)
        return site.layer(closed, "lmt", op=name, lmt=closed)
    apply, _, out_shape = _conv_ops(m, weight, in_shape, torch.float64)
    n_in, n_out = math.prod(in_shape[1:]), math.prod(out_shape)
    if n_in * n_out > 25_000_000:
        raise LipschitzError(
            f"method='exact' builds the dense {n_out}x{n_in} matrix of {node.name}: "
            "too large; use 'power' or 'lmt'"
        )
    matrix = dense_matrix(apply, (1, *in_shape[1:]))
    return site.layer(spectral_norm(matrix), "exact", op=name, lmt=lmt)


@rule(nn.modules.batchnorm._BatchNorm, weighted=True)
def _batch_norm(site: Site) -> LayerBound | None:
    """``max |gamma / sqrt(running_var + eps)|``, or nothing when folded into the layer
    before it (then already counted there)."""
    if site.walk.folds_into(site.inputs[0]) is site.node:
        return None
    return site.layer(float(_bn_scale(site.module).abs().max()))


# weight-free operations: closed forms


@rule(Normalize)
def _normalize(site: Site) -> LayerBound:
    """``(x - mean) / std`` per channel: a diagonal map of norm ``1 / min |std|``."""
    return site.layer(float(1.0 / site.module.std.abs().min()))


@rule(*_ACTIVATIONS)
def _activation(site: Site) -> LayerBound:
    return site.layer(activation_bound(site.module))


@rule(nn.Flatten, nn.Unflatten, nn.Dropout)  # reshapes; dropout is the identity in eval mode
@rule(torch.flatten, torch.reshape, operator.neg, torch.neg)
@rule("view", "reshape", "flatten", "contiguous", "clone", "permute", "transpose", "squeeze",
      "unsqueeze", "float")  # fmt: skip
def _isometry(site: Site) -> LayerBound:
    """Reshapes, permutations and sign flips preserve the L2 norm."""
    return site.layer(1.0)


_FUNCTION_SLOPES = {
    F.relu: 1.0, torch.relu: 1.0, F.relu6: 1.0, torch.tanh: 1.0, F.tanh: 1.0,
    F.softplus: 1.0, torch.sigmoid: 0.25, F.sigmoid: 0.25, "relu": 1.0, "relu_": 1.0,
}  # fmt: skip


@rule(*_FUNCTION_SLOPES)
def _function_slope(site: Site) -> LayerBound:
    """Elementwise functions: the largest |derivative|."""
    return site.layer(_FUNCTION_SLOPES[site.node.target])


@rule(F.silu, F.gelu, F.elu, F.leaky_relu)
def _functional_activation(site: Site) -> LayerBound:
    fn = site.node.target
    if fn is F.silu:
        module: nn.Module = nn.SiLU()
    elif fn is F.gelu:
        module = nn.GELU(approximate=site.node.kwargs.get("approximate", "none"))
    elif fn is F.elu:
        module = nn.ELU(site.arg(1, "alpha", 1.0))
    else:
        module = nn.LeakyReLU(site.arg(1, "negative_slope", 0.01))
    return site.layer(activation_bound(module))


@rule(F.dropout)
def _functional_dropout(site: Site) -> LayerBound:
    """Identity unless called with ``training=True`` (the default of ``F.dropout``!): then
    each element is kept and scaled by ``1 / (1 - p)``, or zeroed."""
    p = site.arg(1, "p", 0.5)
    return site.layer(1.0 / (1.0 - p) if site.arg(2, "training", True) else 1.0)


@rule(operator.add, torch.add, operator.sub, torch.sub, combine=branch_sum)
def _sum(site: Site) -> LayerBound:
    if site.node.kwargs.get("alpha", 1) != 1:
        raise LipschitzError(f"{site.node.name}: {site.name} with alpha is not supported")
    return site.layer(1.0)


@rule(torch.cat, combine=concatenation)
def _cat(site: Site) -> LayerBound:
    return site.layer(1.0, op="cat")


@rule(operator.mul, torch.mul, operator.truediv, torch.div)
def _scale(site: Site) -> LayerBound:
    """A product with (or division by) a constant: ``|c|`` (``1 / min |c|``) for a scalar
    or a stored tensor (broadcast elementwise)."""
    node, fn = site.node, site.node.target
    if len(site.inputs) != 1:
        raise LipschitzError(f"{node.name}: a product of two tensors has no global bound")
    first = node.args[0]
    tensor_first = isinstance(first, fx.Node) and first is site.inputs[0]
    const = node.args[1] if tensor_first else first
    divide = fn in (operator.truediv, torch.div)
    if divide and not tensor_first:
        raise LipschitzError(f"{node.name}: division by the input has no bound")
    if isinstance(const, fx.Node) and const.op == "get_attr":  # a stored tensor
        value: Any = site.walk.gm
        for part in const.target.split("."):
            value = getattr(value, part)
        const = value
    if isinstance(const, torch.Tensor):
        mag = const.detach().abs().double()
        c = float(1.0 / mag.min()) if divide else float(mag.max())
    elif isinstance(const, (int, float)):
        c = 1.0 / abs(const) if divide else abs(const)
    else:
        raise LipschitzError(f"{node.name}: {site.name} by a non-constant has no known bound")
    return site.layer(c)


# pooling


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def _reads_per_position(size: int, out: int, k: int, s: int, p: int, d: int) -> int:
    """The most windows of a 1-D pooling (``out`` windows of ``k`` taps ``d`` apart, the
    j-th from ``j s - p``) that read one of the ``size`` input positions."""
    counts = [0] * size
    for j in range(out):
        for t in range(k):
            i = j * s - p + t * d
            if 0 <= i < size:
                counts[i] += 1
    return max(counts, default=0)


def max_pool_bound(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], kernel: Any, stride: Any,
    padding: Any = 0, dilation: Any = 1,
) -> float:  # fmt: skip
    """Max pooling's exact L2 Lipschitz constant, ``sqrt(n)``, n the most windows that read
    one input pixel.

    ``|max a - max b| <= max |a_i - b_i| <= ||a - b||`` over each window, so the squared
    change of the output is at most the sum over windows of the squared change inside
    each, which counts every pixel once per window reading it: at most n times its
    squared change. A spike at a pixel read n times attains it (the Jacobian there copies
    that pixel to n outputs). The windows are counted from the actual output size, so
    padding, dilation and ceil_mode are exact (a count from the kernel, stride and input
    size alone misses ceil_mode's extra windows: 3x3 windows at stride 2 with ceil_mode
    read pixel (2, 2) of a 4x4 input four times, where ``ceil(min(k, h - k + 1) / s)^2``
    counts once).
    """
    reads = [
        _reads_per_position(size, out, k, s, p, d)
        for size, out, k, s, p, d in zip(
            in_shape[-2:], out_shape[-2:], _pair(kernel), _pair(stride or kernel),
            _pair(padding), _pair(dilation),
        )
    ]  # fmt: skip
    return math.sqrt(reads[0] * reads[1])


def _pooling_norm(pool: Callable[[torch.Tensor], torch.Tensor], size: int) -> float:
    """The norm of a 1-D pooling of ``size`` positions, from its matrix: the pooling applied
    to each unit vector (laid out as a (size, 1, size, 1) batch)."""
    eye = torch.eye(size, dtype=torch.float64).view(size, 1, size, 1)
    return spectral_norm(pool(eye).reshape(size, -1))


def avg_pool_bound(
    in_shape: tuple[int, ...], kernel: Any, stride: Any, padding: Any = 0,
    ceil_mode: bool = False, count_include_pad: bool = True, divisor_override: int | None = None,
) -> float:  # fmt: skip
    """Average pooling's exact norm: the pooling is linear and acts on each channel as the
    Kronecker product of a pooling of rows and one of columns (every divisor PyTorch uses
    is a product of a row count and a column count), and ``||A (x) B|| = ||A|| ||B||``
    (Horn & Johnson, Topics in Matrix Analysis, Sec. 4.2). Each 1-D pooling's matrix
    is PyTorch's own pooling of unit vectors, so padding, ceil_mode and count_include_pad
    divide exactly as at inference; a ``divisor_override`` d sums in both directions and
    divides by d once."""
    h, w = in_shape[-2:]
    kernel, stride, padding = _pair(kernel), _pair(stride or kernel), _pair(padding)
    override = 1 if divisor_override else None

    def along(axis: int, size: int) -> float:  # the pooling of one axis, on (size, 1) inputs
        k, s, p = (kernel[axis], 1), (stride[axis], 1), (padding[axis], 0)
        return _pooling_norm(
            lambda x: F.avg_pool2d(x, k, s, p, ceil_mode, count_include_pad, override), size
        )

    norm = along(0, h) * along(1, w)
    return norm / abs(divisor_override) if divisor_override else norm


def adaptive_avg_pool_bound(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> float:
    """Adaptive average pooling's exact norm, as :func:`avg_pool_bound` (separable: its
    windows and divisors are products of a row and a column range), uneven windows
    included."""
    (h, w), (oh, ow) = in_shape[-2:], out_shape[-2:]
    return _pooling_norm(lambda x: F.adaptive_avg_pool2d(x, (oh, 1)), h) * _pooling_norm(
        lambda x: F.adaptive_avg_pool2d(x, (ow, 1)), w
    )


@rule(nn.MaxPool2d)
def _max_pool(site: Site) -> LayerBound:
    m = site.module
    b = max_pool_bound(site.in_shape, site.out_shape, m.kernel_size, m.stride, m.padding,
                       m.dilation)  # fmt: skip
    return site.layer(b)


@rule(F.max_pool2d)
def _max_pool_function(site: Site) -> LayerBound:
    b = max_pool_bound(site.in_shape, site.out_shape, site.arg(1, "kernel_size"),
                       site.arg(2, "stride"), site.arg(3, "padding", 0),
                       site.arg(4, "dilation", 1))  # fmt: skip
    return site.layer(b)


@rule(nn.AvgPool2d)
def _avg_pool(site: Site) -> LayerBound:
    m = site.module
    b = avg_pool_bound(site.in_shape, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                       m.count_include_pad, m.divisor_override)  # fmt: skip
    return site.layer(b)


@rule(F.avg_pool2d)
def _avg_pool_function(site: Site) -> LayerBound:
    b = avg_pool_bound(site.in_shape, site.arg(1, "kernel_size"), site.arg(2, "stride"),
                       site.arg(3, "padding", 0), site.arg(4, "ceil_mode", False),
                       site.arg(5, "count_include_pad", True),
                       site.arg(6, "divisor_override"))  # fmt: skip
    return site.layer(b)


@rule(nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d)
def _adaptive_avg_pool(site: Site) -> LayerBound:
    return site.layer(adaptive_avg_pool_bound(site.in_shape, site.out_shape))


# ----------------------------------------------------------------------------- the walk


@dataclass
class Step:
    """One bounded node: its rule, the nodes its bound combines, its own factor."""

    node: fx.Node
    inputs: list[fx.Node]
    rule: Rule | None  #: None for the model's input
    layer: LayerBound | None  #: None: factor 1, unlisted (a folded batch norm; in the
    #: tracker, a weighted layer it recomputes)


def _tensor_inputs(node: fx.Node, bounded: set[str]) -> list[fx.Node]:
    """The node's arguments that are bounded tensors, in order, repeats kept."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) or a)
    return [a for a in found if a.name in bounded]


class _Walk:
    """One walk over a traced graph: the settings the weighted rules read, and its steps."""

    def __init__(
        self, gm: fx.GraphModule, method: str = "fft", iters: int = 300, tol: float = 1e-3,
        margin: float = 1e-2, fold_bn: bool = True, seed: int = 0, compare_lmt: bool = False,
        weighted: bool = True,
    ) -> None:  # fmt: skip
        self.gm, self.method, self.iters, self.tol, self.margin = gm, method, iters, tol, margin
        self.fold_bn, self.compare_lmt, self.weighted = fold_bn, compare_lmt, weighted
        self.modules = dict(gm.named_modules())
        self.generator = torch.Generator().manual_seed(seed)
        self._fft_bounds: dict[str, float] | None = None

    def folds_into(self, node: fx.Node) -> fx.Node | None:
        """The eval-mode batch norm folded into ``node`` (a Linear or Conv2d it directly and
        alone follows), when folding; else None."""
        users = list(node.users)
        if not (self.fold_bn and node.op == "call_module" and len(users) == 1):
            return None
        layer, nxt = self.modules[node.target], users[0]
        if not isinstance(layer, (nn.Linear, nn.Conv2d)) or nxt.op != "call_module":
            return None
        bn = self.modules[nxt.target]
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and not bn.training:
            return nxt
        return None

    def folded_weight(self, node: fx.Node) -> tuple[torch.Tensor, bool]:
        """The layer's weight (float64), times the per-output-channel scale of the batch norm
        folded into it: their composition is one linear map, whose norm is at most the
        product of theirs."""
        weight = self.modules[node.target].weight.detach().double()
        bn = self.folds_into(node)
        if bn is None:
            return weight, False
        scale = _bn_scale(self.modules[bn.target])
        return weight * scale.view(-1, *([1] * (weight.ndim - 1))), True

    @property
    def fft_bounds(self) -> dict[str, float]:
        """The fft bounds of all the graph's convolutions, computed at once and in parallel:
        independent, each made of many small factorisations that run best one thread each."""
        if self._fft_bounds is None:
            jobs = {
                node.name: partial(fft_conv_bound, m, self.folded_weight(node)[0],
                                   node.args[0].meta["shape"])
                for node in self.gm.graph.nodes
                if self.method == "fft" and node.op == "call_module"
                and isinstance(m := self.modules[node.target], nn.Conv2d)
                and m.groups == 1
            }  # fmt: skip
            self._fft_bounds = _in_parallel(jobs)
        return self._fft_bounds

    def steps(self) -> tuple[list[Step], fx.Node]:
        """Every bounded node in graph order, and the output node's value."""
        steps: list[Step] = []
        bounded: set[str] = set()
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                steps.append(Step(node, [], None, None))
                bounded.add(node.name)
                continue
            if node.op == "output":
                out = node.args[0]
                if not (isinstance(out, fx.Node) and out.name in bounded):
                    raise LipschitzError("the model's output must be a single tensor")
                return steps, out
            inputs = _tensor_inputs(node, bounded)
            if not inputs or node.meta.get("shape") is None:
                continue  # constants, shape arithmetic, non-tensor results (x.size())
            found = rule_for(node, self.modules)
            module = self.modules[node.target] if node.op == "call_module" else None
            skip = found.weighted and not self.weighted
            layer = None if skip else found.factor(Site(node, inputs, module, self))
            steps.append(Step(node, inputs, found, layer))
            bounded.add(node.name)
        raise LipschitzError("the traced graph has no output")  # pragma: no cover


def propagate(steps: list[Step], factor: Callable[[Step], Any], one: Any = 1.0) -> dict[str, Any]:
    """The bound of every step's output, from its inputs' and its factor: the loop the
    report and the training tracker share (``one``: the input's bound)."""
    bound: dict[str, Any] = {}
    for step in steps:
        if step.rule is None:
            bound[step.node.name] = one
        else:
            inputs = [bound[a.name] for a in step.inputs]
            bound[step.node.name] = step.rule.combine(inputs, factor(step))
    return bound


def _listed_factor(step: Step) -> float:
    return step.layer.bound if step.layer is not None else 1.0


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
    output: OutputSpec = None,
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
        output: for a model whose forward returns a tuple, list or dict: which part is
            the output to bound (an index, a key or a function; see
            :func:`robustlab.nn.adapt.as_classifier`).

    Raises:
        LipschitzError: an operation has no known bound (it is named), the model cannot
            be traced, or a batch norm is in training mode.
        OutputError: the model returns several values and ``output`` does not pick one.

    Example:
        >>> report = lipschitz_bound(model.eval(), (1, 28, 28))
        >>> report.total, print(report.table())
    """
    if method not in METHODS:
        raise LipschitzError(f"method must be one of {METHODS}, got {method!r}")
    shape = tuple(input_shape)
    if len(shape) in (1, 3):
        shape = (1, *shape)
    # the bound is that of the inference function; nothing may move batch-norm statistics
    with preserve_modes(model, training=False):
        gm = _trace(model, shape, output)
        walk = _Walk(gm, method, iters, tol, margin, fold_bn, seed, compare_lmt)
        steps, out = walk.steps()
    bound = propagate(steps, _listed_factor)
    layers = [step.layer for step in steps if step.layer is not None]
    converged = all(layer.converged for layer in layers)
    guaranteed = method != "power"
    return LipschitzReport(bound[out.name], layers, shape, method, guaranteed, converged, bound)
