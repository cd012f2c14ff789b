"""Prints jaxbn's requirements with the named extras, one per line, jaxbn itself left out.

``python .ci/requirements.py test`` lists what ``pip install ".[test]"`` would install besides
jaxbn, self-references (``jaxbn[flax]``) resolved, so that .ci/run can install the
dependencies of an environment while the package is being built elsewhere. Needs Python 3.11+
(tomllib), like jaxbn.
"""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
project = project["project"]


def requirements(extras: list[str], seen: set[str]) -> list[str]:
    out: list[str] = []
    for extra in extras:
        if extra in seen:
            continue
        seen.add(extra)
        for req in project["optional-dependencies"][extra]:
            own = re.fullmatch(r"jaxbn\[([\w,\s-]+)\]", req)
            out += requirements(own.group(1).replace(" ", "").split(","), seen) if own else [req]
    return out


reqs = list(dict.fromkeys(project["dependencies"] + requirements(sys.argv[1:], set())))
print("\n".join(reqs))
