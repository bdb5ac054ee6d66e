"""Shared fixtures. Tests run on CPU; tests marked `gpu` skip without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("ROBUSTLAB_PROGRESS", "0")  # no progress bars in test logs


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_config(tmp_path):
    """A config for a few-second training run on small synthetic images."""
    from robustlab.config import load_config

    def make(*overrides: str):
        base = [
            f"out_dir={tmp_path / 'runs'}",
            "name=tiny",
            "epochs=2",
            "data.name=synthetic",
            "data.options={size: 12, n_train: 256, n_test: 128, num_classes: 4}",
            "data.batch_size=32",
            "model.name=small_cnn",
            "optim.name=adam",
            "optim.lr=0.003",
            "optim.schedule=constant",
        ]
        return load_config(None, base + list(overrides))

    return make


@pytest.fixture(scope="session")
def trained_mnist_model():
    """small_cnn trained briefly on mnist5k (about 90% test accuracy), and the test split."""
    import robustlab as rl
    from robustlab.data import BatchLoader

    torch.manual_seed(0)
    train, test = rl.load_dataset("mnist5k", "train"), rl.load_dataset("mnist5k", "test")
    model = rl.create_model("lenet", in_channels=1, input_size=28, mean=train.mean, std=train.std)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for x, y in BatchLoader(train, 64, shuffle=True):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), test


@pytest.fixture(scope="session")
def lmt_mnist_model(tmp_path_factory):
    """A MaxMin MLP trained briefly with Lipschitz-Margin Training on mnist5k, and the
    test split (certified radii around 0.5-1)."""
    import robustlab as rl
    from robustlab.config import load_config
    from robustlab.train import Trainer

    overrides = [
        f"out_dir={tmp_path_factory.mktemp('lmt')}", "name=lmt", "epochs=4",
        "data.name=mnist5k", "data.batch_size=64", "model.name=mlp", "model.act=maxmin",
        "model.options={hidden: [256, 256]}", "optim.name=adam", "optim.lr=0.001",
        "recipe.name=lmt", "recipe.options={c: 0.5, c_ramp_epochs: 1}",
    ]  # fmt: skip
    run = Trainer(load_config(None, overrides)).fit()
    return rl.load(run), rl.load_dataset("mnist5k", "test")


@pytest.fixture(scope="session")
def pgd_mnist_model(tmp_path_factory):
    """small_cnn adversarially trained (PGD-3, L-inf 0.3, 2 epochs) on mnist5k, and the
    test split: a robust model for checks that must not fire on one."""
    import robustlab as rl
    from robustlab.config import load_config
    from robustlab.train import Trainer

    overrides = [
        f"out_dir={tmp_path_factory.mktemp('pgd')}", "name=pgd", "epochs=2",
        "data.name=mnist5k", "data.batch_size=64", "model.name=small_cnn",
        "optim.name=adam", "optim.lr=0.001", "recipe.name=pgd",
        "recipe.options={eps: 0.3, steps: 3, eps_ramp_epochs: 1}",
    ]  # fmt: skip
    run = Trainer(load_config(None, overrides)).fit()
    return rl.load(run), rl.load_dataset("mnist5k", "test")
