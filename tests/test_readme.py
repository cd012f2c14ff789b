"""The README's code runs as written, its test command is CI's, and the docs cover the API.

Every ```python block of README.md (also those indented inside a list item) runs on its own in a
fresh Python process, with warnings as errors, without the fake devices of conftest.py: a block
that needs several devices must ask for them itself, as a reader's copy would.
"""

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


def test_the_readme_has_its_blocks():
    ids = [i for i, _ in BLOCKS]
    assert len(BLOCKS) >= 8, ids
    assert any(i.startswith("multiple-devices") for i in ids)
    assert all("import" in code for _, code in BLOCKS), "a block must bring its own imports"


@pytest.mark.slow
@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[i for i, _ in BLOCKS])
def test_readme_block_runs_as_written(code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["JAX_PLATFORMS"] = "cpu"
    warn = ["-W", "error"] + [a for w in ALLOWED_WARNINGS for a in ("-W", w)]
    proc = subprocess.run([sys.executable, *warn, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert list(tmp_path.iterdir()) == []  # a README block writes no files


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
