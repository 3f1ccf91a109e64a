"""The README's two set-up commands stay true: CI runs the test command verbatim; both set up alike."""

import re
import shlex

from helpers import REPO


def readme_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)[:2]


def test_readme_starts_with_two_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    first_block = text.index("```bash")
    assert "##" not in text[:first_block]  # nothing but the title and a sentence before them
    main, tests = readme_commands()
    assert main.endswith("shivacmb demo --out demo") and "pytest" in tests
    assert "\n" not in main and "\n" not in tests


def test_ci_runs_the_readme_test_command():
    _, tests = readme_commands()
    assert tests in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_both_commands_install_the_same_environment():
    main, tests = readme_commands()
    install = shlex.split(tests.split("&&")[1])
    assert install == shlex.split(main.split("&&")[1])
