"""Corruption evaluation: the cache, the readers on files written in the published
layouts, the metrics against hand computations, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import robustlab as rl
from robustlab.corruptions import (
    CorruptionReport,
    corrupt,
    corrupted_set,
    evaluate_corruptions,
    open_corruptions,
)


class Brightest(nn.Module):
    """Class = index of the brightest of 4 horizontal bands; deterministic and exact."""

    def forward(self, x):
        bands = x.mean(1).view(x.shape[0], 4, -1).mean(2)
        return bands * 10


def banded(n=40, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.rand(n, 1, size, size, generator=g) * 0.3
    for i, label in enumerate(y.tolist()):
        rows = size // 4
        x[i, :, label * rows : (label + 1) * rows] += 0.6
    return rl.ImageDataset((x.clamp(0, 1) * 255).round().to(torch.uint8), y, num_classes=4)


def test_cached_sets_are_generated_once_and_keyed_by_what_decides_them(tmp_path, monkeypatch):
    import robustlab.corruptions.generate as gen

    data = banded()
    calls = []
    real = gen.corrupt
    monkeypatch.setattr(gen, "corrupt", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    a = corrupted_set(data, "fog", 3, seed=1, cache=tmp_path)
    b = corrupted_set(data, "fog", 3, seed=1, cache=tmp_path)
    assert len(calls) == 1 and torch.equal(a.x, b.x) and torch.equal(a.y, data.y)
    corrupted_set(data, "fog", 3, seed=2, cache=tmp_path)  # another seed: generated
    corrupted_set(data, "fog", 4, seed=1, cache=tmp_path)  # another severity
    other = rl.ImageDataset(data.x.flip(0), data.y.flip(0), num_classes=4)
    corrupted_set(other, "fog", 3, seed=1, cache=tmp_path)  # other images
    assert len(calls) == 4
    # a damaged cache file is regenerated, not trusted
    for f in tmp_path.rglob("*.safetensors"):
        f.write_bytes(b"garbage")
    again = corrupted_set(data, "fog", 3, seed=1, cache=tmp_path)
    assert len(calls) == 5 and torch.equal(again.x, a.x)
    # the pixels do not depend on the chunking of the caller: one chunk here = one call
    assert torch.equal(a.x, corrupt(data.x, "fog", 3, seed=gen._seed(1, "chunk", 0)))


def test_metrics_against_a_hand_computation():
    ours = CorruptionReport(
        "generate", 100, 0.9, {"fog": {1: 0.8, 2: 0.6}, "snow": {1: 0.7, 2: 0.5}}
    )
    base = CorruptionReport(
        "generate", 100, 0.95, {"fog": {1: 0.7, 2: 0.5}, "snow": {1: 0.9, 2: 0.8}}
    )
    ours.against(base, "standard")
    # CE_fog = (0.2 + 0.4) / (0.3 + 0.5); CE_snow = (0.3 + 0.5) / (0.1 + 0.2)
    assert ours.ce["fog"] == pytest.approx(0.6 / 0.8)
    assert ours.ce["snow"] == pytest.approx(0.8 / 0.3)
    assert ours.mce == pytest.approx((0.6 / 0.8 + 0.8 / 0.3) / 2)
    # relative, sums of E - E_clean: fog (0.1 + 0.3) / (0.25 + 0.45),
    # snow (0.2 + 0.4) / (0.05 + 0.15)
    assert ours.relative_ce["fog"] == pytest.approx(0.4 / 0.7)
    assert ours.relative_ce["snow"] == pytest.approx(0.6 / 0.2)
    assert ours.mean_accuracy == pytest.approx((0.8 + 0.6 + 0.7 + 0.5) / 4)
    assert "mCE" in ours.table() and "standard" in ours.table()
    with pytest.raises(rl.ConfigError, match="not evaluated on snow severity 3"):
        CorruptionReport("generate", 1, 1.0, {"snow": {3: 0.5}}).against(base)
    # a baseline that loses nothing to a corruption: relative CE undefined, said so
    flat = CorruptionReport(
        "generate", 1, 0.9, {"fog": {1: 0.95, 2: 0.9}, "snow": base.accuracy["snow"]}
    )
    ours.against(flat)
    assert ours.relative_ce["fog"] is None and ours.relative_mce is None
    assert any("relative CE undefined for fog" in w for w in ours.warnings)
    round_trip = CorruptionReport.from_dict(json.loads(json.dumps(ours.to_dict())))
    assert round_trip.accuracy == ours.accuracy


def test_evaluate_corruptions_counts_by_hand(tmp_path):
    data, model = banded(), Brightest()
    report = evaluate_corruptions(model, data, corruptions=["contrast", "brightness"],
                                  severities=[1, 5], cache=tmp_path)  # fmt: skip
    for name in ("contrast", "brightness"):
        for s in (1, 5):
            x = corrupted_set(data, name, s, cache=tmp_path).float_images()
            want = float((model(x).argmax(1) == data.y).float().mean())
            assert report.accuracy[name][s] == pytest.approx(want)
    assert report.clean_accuracy == pytest.approx(
        float((model(data.float_images()).argmax(1) == data.y).float().mean())
    )
    paths = report.plot(tmp_path / "h.png", tmp_path / "c.png")
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    with pytest.raises(rl.ConfigError, match="fogg"):
        evaluate_corruptions(model, data, corruptions=["fogg"], cache=False)


def write_cifar_c(root, images, labels, names=("fog", "snow")):
    root.mkdir(parents=True)
    for k, name in enumerate(names):  # severity s: images shifted by s + k, so each differs
        stacked = np.concatenate([np.roll(images, s + k, axis=2) for s in range(1, 6)])
        np.save(root / f"{name}.npy", stacked)
    np.save(root / "labels.npy", np.concatenate([labels] * 5))


def test_readers_on_files_written_in_the_published_layouts(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    write_cifar_c(tmp_path / "cifar", images, labels)
    src = open_corruptions(tmp_path / "cifar")
    assert src.layout == "cifar-c" and src.available == {
        "fog": (1, 2, 3, 4, 5),
        "snow": (1, 2, 3, 4, 5),
    }
    sev3 = src.read("snow", 3)
    assert torch.equal(sev3.x, torch.from_numpy(np.roll(images, 4, axis=2)).permute(0, 3, 1, 2))
    assert sev3.y.tolist() == labels.tolist()
    assert len(src.read("fog", 1, n=4)) == 4
    with pytest.raises(rl.ConfigError, match="no corruption 'frost'"):
        src.read("frost", 1)
    # MNIST-C's static release
    for name in ("shear", "stripe"):
        (tmp_path / "mnist" / name).mkdir(parents=True)
        np.save(tmp_path / "mnist" / name / "test_images.npy", images[..., :1])
        np.save(tmp_path / "mnist" / name / "test_labels.npy", labels)
    m = open_corruptions(tmp_path / "mnist")
    assert m.layout == "mnist-c" and set(m.available) == {"shear", "stripe"}
    assert m.read("stripe", 1).x.shape == (6, 1, 8, 8)
    # ImageNet-C: corruption/severity/class/image
    for s in (1, 2):
        for i, (img, label) in enumerate(zip(images, labels)):
            folder = tmp_path / "inet" / "fog" / str(s) / f"n0{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i}.png")
    inet = open_corruptions(tmp_path / "inet")
    assert inet.layout == "imagenet-c" and inet.available == {"fog": (1, 2)}
    read = inet.read("fog", 2)
    assert sorted(read.y.tolist()) == sorted(labels.tolist()) and read.classes == [
        "n00",
        "n01",
        "n02",
    ]
    with pytest.raises(rl.ConfigError, match="not a corruptions directory"):
        open_corruptions(tmp_path / "inet" / "fog" / "1" / "n00")


def test_evaluate_reads_a_directory(tmp_path):
    data = banded(n=12, size=8)
    imgs = data.x.permute(0, 2, 3, 1).numpy()
    write_cifar_c(tmp_path / "c", imgs, data.y.numpy(), names=("fog",))
    model = Brightest()
    report = evaluate_corruptions(model, data, source=tmp_path / "c")
    for s in range(1, 6):
        x = torch.from_numpy(np.roll(imgs, s, axis=2)).permute(0, 3, 1, 2).float() / 255
        want = float((model(x).argmax(1) == data.y).float().mean())
        assert report.accuracy["fog"][s] == pytest.approx(want)


def test_cli_eval_corruptions_with_a_baseline(tiny_config, tmp_path, capsys, monkeypatch):
    from robustlab.cli import main
    from robustlab.train import Trainer

    monkeypatch.setenv("ROBUSTLAB_CACHE", str(tmp_path / "cache"))
    a = Trainer(tiny_config("epochs=1", "name=a")).fit()
    b = Trainer(tiny_config("epochs=1", "name=b", "seed=1")).fit()
    argv = ["--corruptions", "generate", "--n", "16", "--severities", "1,3",
            "--only", "fog,contrast"]  # fmt: skip
    capsys.readouterr()
    assert main(["eval", str(b), *argv, "--baseline", str(a)]) == 2
    assert "evaluate the baseline first" in capsys.readouterr().err
    assert main(["eval", str(a), *argv]) == 0
    assert main(["eval", str(b), *argv, "--baseline", str(a)]) == 0
    out = capsys.readouterr().out
    assert "mCE" in out and "corruptions.json" in out
    saved = json.loads((b / "corruptions.json").read_text())["reports"]["generate"]
    assert set(saved["accuracy"]) == {"fog", "contrast"} and saved["mce"] is not None
    assert (b / "corruptions-imagenet-c.png").is_file()
    assert (b / "corruptions-imagenet-c-severity.png").is_file()
    cached = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(cached) == 4  # 2 corruptions x 2 severities, generated once for both runs
    # a second source is filed beside the first, not over it
    assert main(["eval", str(a), "--corruptions", "mnist-c", "--n", "16", "--only", "shear"]) == 0
    reports = json.loads((a / "corruptions.json").read_text())["reports"]
    assert set(reports) == {"generate", "mnist-c"}
    assert main(["eval", str(b), "--corruptions", "mnist-c", "--n", "16", "--only", "shear",
                 "--baseline", str(a)]) == 0  # fmt: skip
    # the baseline lacks a corruption asked for: a clear error
    capsys.readouterr()
    assert main(["eval", str(b), "--corruptions", "generate", "--n", "16", "--severities", "1",
                 "--only", "snow", "--baseline", str(a)]) == 2  # fmt: skip
    assert "not evaluated on snow" in capsys.readouterr().err
    # overwrite protection is the run directory's: --overwrite of a: the files go with it
    from robustlab.io import OWNED_FILES

    assert "corruptions.json" in OWNED_FILES and "corruptions-mnist-c.png" in OWNED_FILES
