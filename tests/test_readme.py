"""The README's and the docs' code runs as written, the test command is CI's, the docs cover the
API, and what the README says about the main example is what it does.

Every ```python block of README.md and of the pages under docs/ (also those indented inside a
list item) runs on its own in a fresh Python process, with warnings as errors, without the fake
devices of conftest.py: a block that needs several devices must ask for them itself, as a
reader's copy would.
"""

import inspect
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import jaxbn

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# Third-party warnings the blocks may trigger and jaxbn cannot fix; keep in step with the
# filterwarnings of pyproject.toml (none today).
ALLOWED_WARNINGS: list[str] = []


def python_blocks(text: str) -> list[tuple[str, str]]:
    """``(id, code)`` for each fenced python block; the id names the section it is in."""
    blocks, section, counts = [], "top", {}
    fence = re.compile(r"^( *)```python\n(.*?)^\1```", re.M | re.S)
    for m in fence.finditer(text):
        headings = re.findall(r"^#{2,3} (.+)$", text[:m.start()], re.M)
        if headings:
            section = re.sub(r"[^a-z0-9]+", "-", headings[-1].lower()).strip("-")
        counts[section] = counts.get(section, 0) + 1
        blocks.append((f"{section}-{counts[section]}", textwrap.dedent(m.group(2))))
    return blocks


BLOCKS = python_blocks(README)
# The docs pages' own blocks (what they include from the README with --8<-- is not repeated).
DOC_BLOCKS = [(f"{page.relative_to(ROOT / 'docs').with_suffix('')}-{i}".replace("/", "-"), code)
              for page in sorted((ROOT / "docs").rglob("*.md"))
              for i, code in python_blocks(page.read_text())]


def test_the_readme_has_its_blocks():
    ids = [i for i, _ in BLOCKS]
    assert len(BLOCKS) >= 5, ids
    for section in ("quickstart", "multiple-devices", "flax", "deployment"):
        assert any(i.startswith(section) for i in ids), (section, ids)
    assert DOC_BLOCKS, "the docs pages lost their code"
    assert all("import" in code for _, code in BLOCKS + DOC_BLOCKS), (
        "a block must bring its own imports")


def _run_block(code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["JAX_PLATFORMS"] = "cpu"
    warn = ["-W", "error"] + [a for w in ALLOWED_WARNINGS for a in ("-W", w)]
    proc = subprocess.run([sys.executable, *warn, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert list(tmp_path.iterdir()) == []  # a block writes no files


@pytest.mark.slow
@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[i for i, _ in BLOCKS])
def test_readme_block_runs_as_written(code, tmp_path):
    _run_block(code, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("code", [c for _, c in DOC_BLOCKS], ids=[i for i, _ in DOC_BLOCKS])
def test_docs_block_runs_as_written(code, tmp_path):
    _run_block(code, tmp_path)


def test_readme_test_command_is_what_ci_runs():
    m = re.search(r"Run the checks.*?```bash\n(.+?)\n```", README, re.S)
    assert m, "README lost its 'Run the checks' command"
    assert m.group(1).strip() in (ROOT / ".ci" / "run").read_text()


def test_docs_cover_every_public_name():
    """Each name of ``jaxbn.__all__`` has an API reference entry (``::: jaxbn.NAME``)."""
    docs = "\n".join(p.read_text() for p in (ROOT / "docs").rglob("*.md"))
    documented = set(re.findall(r"^::: jaxbn\.([A-Za-z_]\w*)", docs, re.M))
    missing = sorted(set(jaxbn.__all__) - documented)
    assert not missing, f"no '::: jaxbn.NAME' entry in docs/ for {missing}"


def test_readme_names_what_the_main_example_writes():
    """The README's first set-up command runs examples/none_vs_batch.py: the folder and the
    files it says the run writes are the example's defaults."""
    said = re.search(r"writes `([\w/]+)/`", README)
    assert said, "the README no longer says where the main example writes"
    source = (ROOT / "examples" / "none_vs_batch.py").read_text()
    default = re.search(r'"--out", default="([^"]+)"', source)
    assert default and said.group(1) == default.group(1), (said.group(1), default)
    section = README[said.start():said.start() + 400]
    named = re.findall(r"`([\w.]+\.(?:json|png|md))`", section)
    assert named, section
    for name in named:
        assert f'"{name}"' in source, f"the README says the example writes {name}; it does not"


def test_readme_is_a_users_page():
    """What a user needs is in the README; the experiment's report and the design details
    live in the docs site (each page in mkdocs.yml's nav)."""
    headings = re.findall(r"^## (.+)$", README, re.M)
    for needed in ("Install", "Quickstart", "Multiple devices", "Deployment", "Documentation"):
        assert any(h.startswith(needed) for h in headings), (needed, headings)
    assert "| none |" not in README and "What the experiment found" not in README
    experiment = (ROOT / "docs" / "experiment.md").read_text()
    assert "| none | 0.8997" in experiment  # the paper-setting table moved there
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    missing = sorted(p for p in pages if p not in nav)
    assert not missing, f"docs pages absent from mkdocs.yml's nav: {missing}"


def _section_entries(doc: str, heading: str) -> set[str]:
    """Names listed in a Google-style docstring section (``Attributes:``, ``Args:``)."""
    lines = inspect.cleandoc(doc).splitlines()
    names: set[str] = set()
    for i, line in enumerate(lines):
        if line.strip() == f"{heading}:":
            indent = len(line) - len(line.lstrip())
            for entry in lines[i + 1:]:
                if entry.strip() and len(entry) - len(entry.lstrip()) <= indent:
                    break
                m = re.match(r"\s+(\w+)(?: \([^)]*\))?: ", entry)
                if m and len(entry) - len(entry.lstrip()) == indent + 2:
                    names.add(m.group(1))
    return names


def test_the_wrappers_document_every_field():
    """The API reference lists every field of jaxbn.linen.BatchNorm (a docstring Attributes
    section) and every constructor argument of jaxbn.nnx.BatchNorm (an Args section)."""
    import dataclasses

    import jaxbn.linen
    import jaxbn.nnx

    fields = {f.name for f in dataclasses.fields(jaxbn.linen.BatchNorm)} - {"parent", "name"}
    missing = fields - _section_entries(jaxbn.linen.BatchNorm.__doc__ or "", "Attributes")
    assert not missing, f"jaxbn.linen.BatchNorm's Attributes section lacks {sorted(missing)}"
    cls = jaxbn.nnx.BatchNorm
    args = set(inspect.signature(cls.__init__).parameters) - {"self"}
    documented = (_section_entries(cls.__doc__ or "", "Args")
                  | _section_entries(cls.__init__.__doc__ or "", "Args"))
    missing = args - documented
    assert not missing, f"jaxbn.nnx.BatchNorm's Args section lacks {sorted(missing)}"
