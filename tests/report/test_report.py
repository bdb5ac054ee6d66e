"""The report: every number read back from the run directories, one table row per run,
every figure a decodable PNG, user strings escaped, Markdown and JSON alike, files never
overwritten unasked; and (marker ``browser``) the HTML rendered by headless Chromium
with every image loaded and no console error."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

import robustlab as rl
from robustlab.cli import main
from robustlab.report import wilson_interval, write_report
from robustlab.train import Trainer


def test_wilson_interval_against_brute_force():
    """The interval is the set of p with (p_hat - p)^2 <= z^2 p (1 - p) / n: found here
    by scanning p on a fine grid, independently of the closed form."""
    z = 1.96
    grid = [i / 200_000 for i in range(200_001)]
    for k, n in [(0, 10), (3, 10), (10, 10), (37, 100), (499, 500)]:
        inside = [p for p in grid if (k / n - p) ** 2 <= z * z * p * (1 - p) / n]
        lo, hi = wilson_interval(k, n)
        assert lo == pytest.approx(min(inside), abs=2e-5)
        assert hi == pytest.approx(max(inside), abs=2e-5)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.rows, self._table, self.text = [], [], None, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "table":
            self._table = attrs.get("class")
        if tag == "tr" and self._table == "summary":
            self.rows.append([])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._table == "summary" and self.rows and data.strip():
            self.rows[-1].append(data.strip())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A standard and an FGSM run, both evaluated with checks; the FGSM one certified."""
    from robustlab.config import load_config

    root = tmp_path_factory.mktemp("report")
    base = [f"out_dir={root}", "epochs=2", "data.name=synthetic", "model.name=small_cnn",
            "data.options={size: 12, n_train: 256, n_test: 128, num_classes: 4}",
            "data.batch_size=32", "optim.name=adam", "optim.lr=0.003"]  # fmt: skip
    a = Trainer(load_config(None, [*base, "name=plain"])).fit()
    b = Trainer(load_config(None, [*base, "name=fgsm<&>", "recipe.name=fgsm",
                                   "recipe.options={eps: 0.05}"])).fit()  # fmt: skip
    for run in (a, b):
        assert main(["eval", str(run), "--attacks", "fgsm,pgd:steps=3", "--eps", "0.05,0.1",
                     "--n", "60"]) == 0  # fmt: skip
    assert main(["certify", str(b), "--radii", "0.1,0.5", "--n", "60"]) == 0
    assert main(["eval", str(a), "--corruptions", "generate", "--n", "30", "--only",
                 "fog,contrast", "--severities", "1,3"]) == 0  # fmt: skip
    assert main(["transfer", str(a), str(b), "--eps", "0.05", "--n", "30", "--attacks",
                 "pgd:steps=3", "--out", str(root / "transfer.json")]) == 0  # fmt: skip
    return a, b


def test_html_report_reads_every_number_from_the_runs(runs, tmp_path):
    a, b = runs
    out = write_report([a, b], tmp_path / "report.html")
    html = out.read_text()
    page = _Page()
    page.feed(html)
    _header, *rows = page.rows
    assert len(rows) == 2 and [r[0] for r in rows] == ["plain", "fgsm<&>"]  # escaped, shown
    assert "fgsm<&>" not in html and "fgsm&lt;&amp;&gt;" in html  # user strings escaped
    for run, row in zip((a, b), rows):
        ev = json.loads((run / "eval.json").read_text())
        assert f"{100 * ev['clean_accuracy']:.1f}%" in row
        for r in ev["robust"]["results"]:
            assert any(cell.startswith(f"{100 * r['robust_accuracy']:.1f}% [") for cell in row)
    cert = json.loads((b / "certify.json").read_text())["report"]
    assert any(f"{100 * cert['certified_accuracy'][1]:.1f}% @ 0.5" in c for c in rows[1])
    assert not re.search(r"https?://", html)  # self-contained: nothing fetched
    # every image is an embedded PNG that decodes; curves, certified, training, examples
    assert len(page.images) >= 5
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        image.verify()


def test_json_and_markdown_reports(runs, tmp_path):
    a, b = runs
    j = write_report([a, b], tmp_path / "r.json", rl.report.Options(examples=0))
    payload = json.loads(j.read_text())
    curves = payload["sections"]["accuracy_vs_eps"]["data"]
    ev = json.loads((a / "eval.json").read_text())
    want = [r["robust_accuracy"] for r in ev["robust"]["results"]]
    assert curves["plain"]["accuracy"][1:] == want
    assert "examples" not in payload["sections"]
    md = write_report([a, b], tmp_path / "r.md")
    text = md.read_text()
    assert text.count("\n| plain |") == 1 and "fgsm\\<" not in text
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert figures and all((tmp_path / f).is_file() for f in figures)


def test_report_refuses_to_overwrite_and_bad_input(runs, tmp_path, capsys):
    a, _ = runs
    out = tmp_path / "report.html"
    out.write_text("mine")
    assert main(["report", str(a), "-o", str(out)]) != 0
    assert "exists" in capsys.readouterr().err and out.read_text() == "mine"
    assert main(["report", str(a), "-o", str(out), "--overwrite"]) == 0
    assert "<html" in out.read_text()
    assert main(["report", str(a), "-o", str(tmp_path / "r.pdf")]) != 0
    assert "-o must end in" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "x.html")]) != 0
    bad = tmp_path / "t.json"
    bad.write_text("{}")
    assert main(["report", str(a), "-o", str(tmp_path / "y.html"), "--transfer", str(bad)]) != 0
    assert "not a `robustlab transfer` result" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]  # fmt: skip


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: chromium)")
def test_report_renders_in_chromium(runs, tmp_path):
    a, b = runs
    out = write_report([a, b], tmp_path / "report.html")
    url = out.resolve().as_uri()
    dom = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    count = len(re.findall(r"<img ", out.read_text()))
    # the page's own check, run after load: every image decoded
    assert re.search(rf'<body data-images="{count}/{count}"', dom.stdout), dom.stdout[:300]
    page = _Page()
    page.feed(dom.stdout)
    assert len(page.rows) == 3  # header + a row per run
    assert "CONSOLE" not in dom.stderr, [x for x in dom.stderr.splitlines() if "CONSOLE" in x]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}",
         "--window-size=1280,1600", url], capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    image = Image.open(shot)
    assert image.size == (1280, 1600)
    assert len(set(image.convert("L").resize((64, 80)).tobytes())) > 20  # not a blank page


def test_corruption_and_transfer_sections(runs, tmp_path):
    a, b = runs
    transfer = json.loads((a.parent / "transfer.json").read_text())
    opts = rl.report.Options(examples=0, transfer=transfer)
    out = write_report([a, b], tmp_path / "r.json", opts)
    sections = json.loads(out.read_text())["sections"]
    corr = json.loads((a / "corruptions.json").read_text())["reports"]["generate"]
    assert sections["corruptions"]["data"] == {"plain/generate": corr["accuracy"]}
    row = next(r for r in sections["summary"]["rows"] if r[0] == "plain")
    assert f"generate: {100 * corr['mean_accuracy']:.1f}% mean" in row
    assert sections["transfer"]["data"]["accuracy"] == transfer["accuracy"]
    html = write_report([a, b], tmp_path / "r.html", opts)
    page = _Page()
    page.feed(html.read_text())
    assert any("Transfer at eps 0.05" in t for t in page.text)
    assert any("accuracy per corruption and severity" in t for t in page.text)


def test_runs_without_results_and_damaged_files(tmp_path, tiny_config, capsys):
    run = Trainer(tiny_config("epochs=1", "name=bare")).fit()
    out = write_report([run], tmp_path / "bare.html")  # no eval, certify or corruptions
    page = _Page()
    page.feed(out.read_text())
    assert len(page.rows) == 2 and page.rows[1][0] == "bare"
    (run / "eval.json").write_text("{not json")
    assert main(["report", str(run), "-o", str(tmp_path / "x.html")]) != 0
    assert "cannot read" in capsys.readouterr().err and not (tmp_path / "x.html").exists()


def test_universal_perturbation_section(runs, tmp_path):
    from robustlab.attacks.universal import UniversalPerturbation

    a, _ = runs
    train = rl.load_dataset("synthetic", "train", size=12, n_train=256, n_test=128,
                            num_classes=4).subset(64)  # fmt: skip
    uap = UniversalPerturbation(rl.load(a), xi=0.1, max_passes=1).fit(train)
    uap.save(tmp_path / "uap.safetensors")
    opts = rl.report.Options(examples=0, universal=[str(tmp_path / "uap.safetensors")])
    sections = json.loads(write_report([a], tmp_path / "u.json", opts).read_text())["sections"]
    saved = sections["universal"]["data"][str(tmp_path / "uap.safetensors")]
    assert saved == {"xi": 0.1, "norm": "linf", "history": uap.history}
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    with pytest.raises(rl.RobustlabError):
        write_report(
            [a],
            tmp_path / "v.html",
            rl.report.Options(universal=[str(tmp_path / "bad.safetensors")]),
        )


def test_defended_run_shows_naive_versus_adaptive(tiny_config, tmp_path):
    run = Trainer(tiny_config("epochs=1", "name=squeezed", "defenses=[bitdepth:bits=1]")).fit()
    assert main(["eval", str(run), "--attacks", "pgd:steps=5", "--eps", "0.1,0.3",
                 "--n", "40"]) == 0  # fmt: skip
    robust = json.loads((run / "eval.json").read_text())["robust"]
    out = write_report([run], tmp_path / "d.html", rl.report.Options(examples=2))
    page = _Page()
    page.feed(out.read_text())
    cell = page.rows[1][page.rows[0].index("naive → adaptive")]
    naive = robust["modes"]["naive"]["results"]
    triples = zip(naive, robust["robust_accuracy"], robust["eps"])
    want = "; ".join(
        f"{e:g}: {100 * n['robust_accuracy']:.1f}% → {100 * a:.1f}%" for n, a, e in triples
    )
    assert cell == want
    assert any("attacked adaptively" in t for t in page.text)


def test_norms_get_their_own_columns_and_curves(runs, tmp_path, tiny_config):
    a, _ = runs
    l2 = Trainer(tiny_config("epochs=1", "name=l2run")).fit()
    assert main(["eval", str(l2), "--attacks", "pgd:steps=3", "--eps", "0.1", "--norm", "l2",
                 "--n", "30"]) == 0  # fmt: skip
    out = write_report([a, l2], tmp_path / "n.json", rl.report.Options(examples=0))
    sections = json.loads(out.read_text())["sections"]
    header = sections["summary"]["header"]
    assert "robust @ l2 0.1" in header and "robust @ linf 0.1" in header
    l2_row = next(r for r in sections["summary"]["rows"] if r[0] == "l2run")
    linf_cell = l2_row[header.index("robust @ linf 0.1")]
    assert linf_cell == "–" and l2_row[header.index("points")] == "30 test"
    assert sections["accuracy_vs_eps"]["data"]["l2run"]["norm"] == "l2"


def test_report_refuses_a_run_twice_and_keeps_foreign_files(runs, tmp_path):
    a, b = runs
    with pytest.raises(rl.ConfigError, match="more than once"):
        write_report([a, b, Path(str(a) + "/")], tmp_path / "t.html")
    md = tmp_path / "r.md"
    write_report([a], md, rl.report.Options(examples=0))
    figures = md.with_name("r_files")
    assert sorted(p.name for p in figures.iterdir())  # figures written beside it
    with pytest.raises(rl.ConfigError, match="exists"):
        write_report([a], md, rl.report.Options(examples=0))
    md.unlink()
    with pytest.raises(rl.ConfigError, match="r_files exists"):  # the figures' folder too
        write_report([a], md, rl.report.Options(examples=0))
    (figures / "notes.txt").write_text("mine")
    with pytest.raises(rl.ConfigError, match="did not write.*notes.txt"):
        write_report([a], md, rl.report.Options(examples=0), overwrite=True)
    assert (figures / "notes.txt").read_text() == "mine"
