"""Attacks, one algorithm per file, all registered by name in ``ATTACKS``.

Every attack takes pixels in [0, 1] and epsilons in pixel units, leaves the model as
it found it, and returns points inside the threat model::

    x_adv = PGD(model, eps=0.3, steps=40, step_size=0.01)(x, y)
    result = APGD(model, eps=0.3, loss="dlr").run(x, y)   # result.success per sample
"""

from robustlab.attacks.apgd import APGD, APGDT
from robustlab.attacks.base import (
    ATTACKS,
    EOT,
    Attack,
    AttackError,
    AttackResult,
    LossFn,
    attack_loss,
    lp_norm,
    project,
)
from robustlab.attacks.bpda import BPDA
from robustlab.attacks.cw import CW
from robustlab.attacks.deepfool import DeepFool
from robustlab.attacks.fast import fast_model
from robustlab.attacks.fgsm import FGSM
from robustlab.attacks.pgd import BIM, PGD
from robustlab.attacks.square import Square
from robustlab.attacks.universal import UniversalPerturbation

__all__ = [
    "APGD",
    "APGDT",
    "ATTACKS",
    "BIM",
    "BPDA",
    "CW",
    "EOT",
    "FGSM",
    "PGD",
    "Attack",
    "AttackError",
    "AttackResult",
    "DeepFool",
    "LossFn",
    "Square",
    "UniversalPerturbation",
    "attack_loss",
    "fast_model",
    "lp_norm",
    "project",
]
