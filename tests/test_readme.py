"""README stays true: its set-up block, its Python example, the CI script that runs its tests."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_exactly_two_setup_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first_block is not None and README.index("```bash") < README.index("\n## ")
    lines = [line for line in first_block.group(1).splitlines() if line.strip()]
    assert len(lines) == 2
    assert lines[0].endswith("moekit quickstart")
    assert "pytest" in lines[1]
    # CI runs the README's second line, so the two cannot drift apart.
    assert "sed -n 2p" in (ROOT / ".ci" / "run").read_text()


def test_python_example_runs():
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["out"].logits.shape == (2, 64, 4096)
    assert namespace["out"].loss is not None
