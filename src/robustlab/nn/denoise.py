"""Feature-denoising blocks and their insertion into any model.

Xie, Wu, van der Maaten, Yuille & He, "Feature denoising for improving adversarial
robustness", CVPR 2019: a block inside the network denoises a feature map and adds the
result back through a residual connection,

    out = x + BN(conv1x1(denoise(x)))

with the batch norm's scale (gamma) initialised to 0, so that a freshly inserted block
is exactly the identity and a pretrained network keeps its function until training
moves gamma. ``denoise`` is one of

- ``nonlocal_gaussian``: non-local means with embedded Gaussian (softmax) weights,
  ``y_i = sum_j softmax_j(theta(x_i) . phi(x_j) / sqrt(d)) x_j`` (the paper's best);
- ``nonlocal_dot``: dot-product weights normalised by the number of positions N,
  ``y_i = (1/N) sum_j (theta(x_i) . phi(x_j)) x_j`` (the weights need not sum to 1);
- ``mean``: a 3x3 mean filter; ``median``: a 3x3 median filter (edges replicated).

theta and phi are 1x1 convolutions to half the channels (``embed=True``, as in the
paper and its released code) or the identity (``embed=False``); d is their number of
output channels. The weighted sum runs over the features x themselves (no embedding).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.errors import RobustlabError, did_you_mean
from robustlab.nn.adapt import preserve_modes

#: denoising operations a :class:`DenoisingBlock` offers
KINDS = ("nonlocal_gaussian", "nonlocal_dot", "mean", "median")

#: modules whose output channel count :func:`insert_denoising` reads without a dry run
_CHANNELS_ATTR = (
    (nn.Conv2d, "out_channels"),
    (nn.ConvTranspose2d, "out_channels"),
    (nn.BatchNorm2d, "num_features"),
    (nn.InstanceNorm2d, "num_features"),
    (nn.GroupNorm, "num_channels"),
)


class DenoiseError(RobustlabError, ValueError):
    """A denoising block cannot be built or inserted where asked."""


def _check_kind(kind: str, embed: bool) -> None:
    if kind not in KINDS:
        raise DenoiseError(
            f"unknown denoising kind {kind!r}{did_you_mean(str(kind), KINDS)} "
            f"(choose from {', '.join(KINDS)})"
        )
    if not isinstance(embed, bool):
        raise DenoiseError(f"embed must be true or false, got {embed!r}")


class DenoisingBlock(nn.Module):
    """Residual feature-denoising block (Xie et al., CVPR 2019).

    Args:
        channels: feature channels C.
        kind: ``"nonlocal_gaussian"`` (default), ``"nonlocal_dot"``, ``"mean"`` or
            ``"median"``.
        embed: non-local kinds only: compare 1x1-conv embeddings theta, phi with
            max(1, C // 2) channels (default, weights initialised N(0, 0.01^2) as in the
            released code) instead of the features themselves.

    Shapes:
        Input (B, C, H, W); output the same. The non-local kinds cost O((HW)^2) memory
        for the Gaussian weights.

    Example:
        >>> block = DenoisingBlock(64)
        >>> torch.equal(block(x), x)  # gamma starts at 0: the identity
        True
    """

    def __init__(self, channels: int, kind: str = "nonlocal_gaussian", embed: bool = True) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise DenoiseError(f"channels must be an integer >= 1, got {channels!r}")
        _check_kind(kind, embed)
        self.channels, self.kind, self.embed = channels, kind, embed
        self.after = ""  #: the module the block follows, for messages (insert_denoising)
        self.theta: nn.Conv2d | None = None
        self.phi: nn.Conv2d | None = None
        if kind.startswith("nonlocal") and embed:
            inner = max(1, channels // 2)
            self.theta = nn.Conv2d(channels, inner, 1, bias=False)
            self.phi = nn.Conv2d(channels, inner, 1, bias=False)
            nn.init.normal_(self.theta.weight, std=0.01)
            nn.init.normal_(self.phi.weight, std=0.01)
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.bn.weight)  # the block starts as the identity

    def _embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """theta(x), phi(x) flattened to (B, d, N)."""
        theta = x if self.theta is None else self.theta(x)
        phi = x if self.phi is None else self.phi(x)
        return theta.flatten(2), phi.flatten(2)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The non-local weights f(x_i, x_j) / C(x), (B, N, N), rows i, columns j."""
        if not self.kind.startswith("nonlocal"):
            raise DenoiseError(f"a {self.kind!r} block has no non-local weights")
        theta, phi = self._embeddings(x)
        affinity = theta.transpose(1, 2) @ phi  # (B, N, N): theta_i . phi_j
        if self.kind == "nonlocal_gaussian":
            return torch.softmax(affinity / math.sqrt(theta.shape[1]), dim=-1)
        return affinity / affinity.shape[-1]

    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """The denoising operation alone (before the 1x1 conv, BN and residual add)."""
        if self.kind == "mean":
            return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        if self.kind == "median":
            b, c, h, w = x.shape
            patches = F.unfold(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3)
            return patches.view(b, c, 9, h, w).median(dim=2).values
        b, c, h, w = x.shape
        g = x.flatten(2)  # (B, C, N)
        if self.kind == "nonlocal_dot":
            theta, phi = self._embeddings(x)
            d, n = theta.shape[1], theta.shape[2]
            if 2 * d * c < n * (d + c):  # cheaper association: theta^T (phi g^T) / N
                y = (theta.transpose(1, 2) @ (phi @ g.transpose(1, 2))) / n
                return y.transpose(1, 2).reshape(b, c, h, w)
        y = self.weights(x) @ g.transpose(1, 2)  # (B, N, C): y_i = sum_j w_ij x_j
        return y.transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            where = f" after {self.after!r}" if self.after else ""
            raise DenoiseError(
                f"the denoising block{where} expects features (B, {self.channels}, H, W), "
                f"got shape {tuple(x.shape)}"
            )
        return x + self.bn(self.conv(self.denoise(x)))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kind={self.kind!r}, embed={self.embed}"


class _RunAfter:
    """Forward hook that passes a module's output through its child block ``attr``."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        return module.get_submodule(self.attr)(output)


def _channels_from_module(name: str, module: nn.Module) -> int:
    for m in [module, *reversed(list(module.modules()))]:
        for cls, attr in _CHANNELS_ATTR:
            if isinstance(m, cls):
                return int(getattr(m, attr))
    raise DenoiseError(
        f"cannot tell the output channels of {name!r} ({type(module).__name__}): "
        "pass example= (an input batch) so that a dry run measures them"
    )


def _dry_run(model: nn.Module, modules: dict[str, nn.Module], example: Any) -> dict[str, list]:
    """Run ``model`` on ``example`` (eval mode, no gradient) recording each module's outputs."""
    seen: dict[str, list] = {name: [] for name in modules}
    handles = [
        m.register_forward_hook(lambda _m, _i, out, name=name: seen[name].append(out))
        for name, m in modules.items()
    ]
    try:
        with torch.no_grad(), preserve_modes(model, training=False):
            if isinstance(example, tuple):
                model(*example)
            else:
                model(example)
    finally:
        for h in handles:
            h.remove()
    return seen


def insert_denoising(
    model: nn.Module,
    after: str | Sequence[str],
    kind: str = "nonlocal_gaussian",
    embed: bool = True,
    example: Any = None,
) -> nn.Module:
    """A copy of ``model`` with a :class:`DenoisingBlock` after each named submodule.

    The block becomes a child called ``denoise`` of the module it follows (``denoise_1``
    ... if taken) and runs on that module's output: appended to an ``nn.Sequential``,
    through a forward hook otherwise. Every original state-dict key is kept; the block
    adds ``<name>.denoise.*``. Blocks start as the identity, so the copy computes what
    ``model`` does until gamma is trained. ``model`` itself is not changed.

    Args:
        model: any ``nn.Module``.
        after: names from ``model.named_modules()`` (``"layers.1"``, ``"0"``).
        kind, embed: as :class:`DenoisingBlock`.
        example: an input batch (a tuple for several arguments). A dry run on it (eval
            mode, no gradient, nothing changed) measures each module's output and then
            checks that every block runs once per call of its module. Without it the
            channel count comes from the module (a conv or norm, or the last one inside a
            composite block) and is checked by the block at its first forward.

    Returns:
        The new model.

    Raises:
        DenoiseError: an unknown name (with the nearest), a container that is never
            called, a module that does not run or whose output is not (B, C, H, W).

    Example:
        >>> model = insert_denoising(create_model("preact_resnet18"), ["layers.3", "layers.5"])
    """
    names = [after] if isinstance(after, str) else list(after)
    if not names:
        raise DenoiseError("after= names no module: give at least one submodule name")
    known = {n: m for n, m in model.named_modules() if n}
    for name in names:
        if name not in known:
            raise DenoiseError(
                f"model has no submodule {name!r}{did_you_mean(str(name), known)} "
                f"(names come from model.named_modules())"
            )
        if isinstance(known[name], (nn.ModuleList, nn.ModuleDict)):
            raise DenoiseError(
                f"{name!r} is a {type(known[name]).__name__}, which is never called: "
                "name the module whose output the block should denoise"
            )
    if len(set(names)) != len(names):
        raise DenoiseError(f"after= names a module twice: {names}")
    _check_kind(kind, embed)

    new = copy.deepcopy(model)
    targets = {name: new.get_submodule(name) for name in names}
    channels: dict[str, int] = {}
    like: dict[str, torch.Tensor] = {}  # a tensor whose device and dtype the block takes
    reference = next(iter(new.parameters()), None)
    if example is not None:
        for name, outs in _dry_run(new, targets, example).items():
            if not outs:
                raise DenoiseError(f"{name!r} did not run when the model ran on the example")
            bad = [o for o in outs if not (isinstance(o, torch.Tensor) and o.ndim == 4)]
            if bad:
                what = tuple(bad[0].shape) if isinstance(bad[0], torch.Tensor) else type(bad[0])
                raise DenoiseError(
                    f"the output of {name!r} is {what}, not a feature map (B, C, H, W)"
                )
            if len({o.shape[1] for o in outs}) > 1:
                raise DenoiseError(f"{name!r} runs more than once with different channels")
            channels[name], like[name] = int(outs[0].shape[1]), outs[0]
    else:
        for name, m in targets.items():
            channels[name] = _channels_from_module(name, m)
            own = next(iter(m.parameters()), reference)
            if own is not None:
                like[name] = own

    blocks = {}
    for name, module in targets.items():
        block = DenoisingBlock(channels[name], kind, embed)
        block.after = name
        if name in like and like[name].is_floating_point():
            block.to(device=like[name].device, dtype=like[name].dtype)
        attr, i = "denoise", 0
        while hasattr(module, attr):
            i += 1
            attr = f"denoise_{i}"
        module.add_module(attr, block)
        if type(module).forward is not nn.Sequential.forward:
            module.register_forward_hook(_RunAfter(attr))
        blocks[name] = block

    if example is not None:  # every block runs once per call of the module it follows
        modules = {**{f"@{n}": b for n, b in blocks.items()}, **targets}
        seen = _dry_run(new, modules, example)
        for name in names:
            if len(seen[f"@{name}"]) != len(seen[name]):
                raise DenoiseError(
                    f"the block after {name!r} ran {len(seen[f'@{name}'])} times for "
                    f"{len(seen[name])} calls of {name!r}: its forward does not suit "
                    "insertion; choose another module"
                )
    return new
