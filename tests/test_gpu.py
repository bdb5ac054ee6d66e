"""CUDA paths: the same contracts on a GPU as on the CPU (skipped where CUDA is absent).

Each test compares the GPU result with the CPU one computed here, so a device-specific
bug (a tensor left on the CPU, a dtype changed by autocast, a mode not restored) shows.
"""

from __future__ import annotations

import pytest
import torch

import robustlab as rl

pytestmark = pytest.mark.gpu


@pytest.fixture
def small():
    torch.manual_seed(0)
    model = rl.create_model("small_cnn", num_classes=4, in_channels=1, input_size=12, bn=True)
    data = rl.load_dataset("synthetic", "test", size=12, n_test=64, num_classes=4, channels=1)
    return model.eval(), data


@pytest.mark.parametrize("name", ["fgsm", "pgd", "apgd", "square", "deepfool", "cw"])
def test_attacks_keep_their_contracts_on_cuda(small, name):
    model, data = small
    model = model.cuda()
    x, y = data.float_images()[:16].cuda(), data.y[:16].cuda()
    cls = rl.attacks.ATTACKS.get(name)
    eps = None if cls.minimum_norm else 0.1
    kwargs = {"n_queries": 50} if name == "square" else {}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x_adv = cls(model, eps=eps, seed=0, **kwargs)(x, y)
    assert x_adv.device == x.device and x_adv.dtype == x.dtype and x_adv.shape == x.shape
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    if eps is not None:
        assert float((x_adv - x).abs().amax()) <= eps + 1e-6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pgd_on_cuda_matches_the_cpu(small):
    model, data = small
    x, y = data.float_images()[:32], data.y[:32]
    cpu = rl.attacks.PGD(model, eps=0.1, steps=10, random_start=False)(x, y)
    gpu = rl.attacks.PGD(model.cuda(), eps=0.1, steps=10, random_start=False)(x.cuda(), y.cuda())
    # sign steps can flip where a gradient is ~0; nearly all pixels agree
    assert (gpu.cpu() - cpu).abs().gt(1e-4).float().mean() < 0.01


def test_evaluate_on_cuda_matches_the_cpu(small):
    model, data = small
    kw = dict(attacks=["fgsm"], eps=[0.05, 0.1], n=64, fast=False)
    cpu = rl.evaluate(model, data, **kw)
    gpu = rl.evaluate(model.cuda(), data, **kw)
    assert gpu.clean_accuracy == cpu.clean_accuracy
    for a, b in zip(gpu.results, cpu.results):
        assert abs(a.robust_accuracy - b.robust_accuracy) <= 2 / 64


def test_lipschitz_bound_on_cuda_matches_the_cpu(small):
    from robustlab.certify import lipschitz_bound

    model, _ = small
    cpu = lipschitz_bound(model, (1, 12, 12)).total
    gpu = lipschitz_bound(model.cuda(), (1, 12, 12)).total
    assert gpu == pytest.approx(cpu, rel=1e-4)


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_training_on_cuda_with_amp_writes_a_loadable_run(tmp_path, amp):
    cfg = rl.load_config(
        None,
        [
            f"out_dir={tmp_path}", "name=gpu", "epochs=1", "device=cuda", f"amp={amp}",
            "data.name=synthetic", "data.options={size: 12, n_train: 128, n_test: 64}",
            "data.batch_size=32", "recipe.name=pgd", "recipe.options={eps: 0.1, steps: 2}",
        ],
    )  # fmt: skip
    run = rl.Trainer(cfg).fit()
    model = rl.load(run)  # on the CPU
    assert next(model.parameters()).device.type == "cpu"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert rl.Trainer(cfg, extend=False, resume=False, overwrite=True).fit() == run
