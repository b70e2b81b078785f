"""The README and docs/: every relative link resolves to a file of the repository, and the README stays a
front page."""
import glob
import os
import re

import pytest

from tests.conftest import ROOT

PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    with open(os.path.join(ROOT, page)) as fh:
        text = fh.read()
    links = [target.split("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", text)
             if "://" not in target and not target.startswith("#")]
    missing = [t for t in links if not os.path.exists(os.path.join(ROOT, os.path.dirname(page), t))]
    assert not missing, f"{page}: {missing}"


def test_the_readme_is_a_front_page():
    with open(os.path.join(ROOT, "README.md")) as fh:
        lines = fh.read().splitlines()
    assert len(lines) <= 250
    assert any("make test" in line for line in lines)  # the test command CI runs (.ci/run)
