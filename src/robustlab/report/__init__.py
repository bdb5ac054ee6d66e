"""Reports people would rather look at: one self-contained HTML file (images embedded,
no network access), Markdown for papers and issues, or JSON with every figure's numbers.

    robustlab report runs/demo-mnist runs/demo-pgd-mnist -o report.html

Everything is read from the run directories (:mod:`robustlab.report.collect`); the
sections are functions in :mod:`robustlab.report.sections`, one per kind of result.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from robustlab.errors import ConfigError
from robustlab.io import atomic_write, atomic_write_text
from robustlab.report.collect import RunData, load_run, wilson_interval
from robustlab.report.sections import SECTIONS, Options, Section, section

__all__ = [
    "SECTIONS",
    "Options",
    "RunData",
    "Section",
    "build",
    "section",
    "wilson_interval",
    "write_report",
]

FORMATS = (".html", ".md", ".json")
#: the figure files a Markdown report writes beside itself
_FIGURE = re.compile(r"[a-z_]+-\d+\.png")


def build(
    runs: list[str | Path], options: Options | None = None
) -> tuple[list[RunData], list[Section]]:
    """Read the runs and build every section that has something to show."""
    if not runs:
        raise ConfigError("a report needs at least one run directory")
    data = [load_run(r) for r in runs]
    paths = [d.path.resolve() for d in data]
    twice = sorted({str(p) for p in paths if paths.count(p) > 1})
    if twice:
        raise ConfigError(f"run given more than once: {', '.join(twice)}")
    names = [d.name for d in data]
    if len(set(names)) != len(names):  # two runs with one name: tell them apart by path
        for d in data:
            d.name = str(d.path)
    opts = options or Options()
    sections = [s for fn in SECTIONS if (s := fn(data, opts)) is not None]
    return data, sections


def write_report(
    runs: list[str | Path],
    out: str | Path,
    options: Options | None = None,
    *,
    overwrite: bool = False,
    title: str = "robustlab report",
) -> Path:
    """Write the report to ``out``: ``.html`` (self-contained), ``.md`` (figures as PNG
    files in ``<out stem>_files/``) or ``.json`` (every section's numbers)."""
    out = Path(out)
    if out.suffix not in FORMATS:
        raise ConfigError(f"-o must end in {', '.join(FORMATS)}, got {out.name}")
    if out.is_dir():
        raise ConfigError(f"-o {out} is a directory; name a file")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists: choose another -o, or pass --overwrite to replace it")
    files = out.with_name(f"{out.stem}_files")
    if out.suffix == ".md" and files.exists():
        foreign = [p.name for p in files.iterdir() if not _FIGURE.fullmatch(p.name)]
        if foreign:
            raise ConfigError(
                f"{files} holds files the report did not write ({', '.join(foreign[:5])}): "
                "choose another -o"
            )
        if not overwrite:
            raise ConfigError(f"{files} exists: choose another -o, or pass --overwrite")
        for p in files.iterdir():  # --overwrite: the old report's figures only
            p.unlink()
    data, sections = build(runs, options)
    context = _context(data, sections, title)
    if out.suffix == ".json":
        payload = {
            "title": title,
            "created": context["created"],
            "runs": [str(d.path) for d in data],
            "sections": {
                s.key: {
                    "title": s.title,
                    "text": s.text,
                    "header": s.header,
                    "rows": s.rows,
                    "items": s.items,
                    "data": s.data,
                }
                for s in sections
            },
        }
        atomic_write_text(out, json.dumps(payload, indent=1, default=_jsonable))
    elif out.suffix == ".md":
        atomic_write_text(out, _markdown(context, out))
    else:
        atomic_write_text(out, _environment().get_template("report.html.j2").render(**context))
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _context(data: list[RunData], sections: list[Section], title: str) -> dict[str, Any]:
    from robustlab import __version__

    return {
        "title": title,
        "runs": data,
        "sections": sections,
        "version": __version__,
        "created": time.strftime("%Y-%m-%d %H:%M"),
    }


def _environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("robustlab.report", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown(context: dict[str, Any], out: Path) -> str:
    """Markdown with the figures written beside it (``<stem>_files/<section>-<i>.png``)."""
    files = out.with_name(f"{out.stem}_files")
    lines = [
        f"# {context['title']}",
        "",
        f"{len(context['runs'])} runs · robustlab {context['version']} · {context['created']}",
        "",
    ]
    for s in context["sections"]:
        lines += [f"## {s.title}", ""]
        if s.text:
            lines += [s.text, ""]
        if s.header:
            lines.append("| " + " | ".join(_md_cell(h) for h in s.header) + " |")
            lines.append("|" + "---|" * len(s.header))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in s.rows]
            lines.append("")
        lines += [f"- {item}" for item in s.items] + ([""] if s.items else [])
        for i, f in enumerate(s.figures):
            path = files / f"{s.key}-{i}.png"
            atomic_write(path, lambda tmp, png=f.png: tmp.write_bytes(png))
            lines += [f"![{f.alt}]({files.name}/{path.name})", "", f"*{f.caption}*", ""]
    return "\n".join(lines)
