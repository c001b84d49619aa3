"""README.md: its two set-up commands come first, and CI runs the test command verbatim."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _blocks(text, language):
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_readme_opens_with_the_two_set_up_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    first_fence = readme.index("```")
    assert "```" not in readme[:first_fence]
    shell = _blocks(readme, "bash")
    demo, test = shell[0].strip(), shell[1].strip()
    assert readme.index(shell[1]) < readme.index("\n\n", readme.index(shell[1])) < len(readme)
    assert "demo" in demo and "[demo]" in demo
    assert "pytest" in test and "[test]" in test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci, "the CI script must run README's test command verbatim"
    # Nothing but the title precedes the two commands.
    head = readme[:readme.index(shell[1]) + len(shell[1])]
    assert [line for line in head.splitlines() if line and not line.startswith(("```", "#"))] == [demo, test]
