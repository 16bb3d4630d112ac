"""The README's Python examples run as written."""

import re
from pathlib import Path

# torch 2.13: torch._dynamo imported after init_process_group (the README's expert-
# parallel example) keeps the gloo group alive past destroy and can abort at exit.
import torch._dynamo  # noqa: F401

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run():
    blocks = _python_blocks()
    assert blocks, "the README has no python examples"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
        for name, obj in namespace.items():  # run any RouterContract the README defines
            if name.startswith("Test") and isinstance(obj, type):
                suite = obj()
                for test in dir(suite):
                    if test.startswith("test_"):
                        getattr(suite, test)()


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    command = re.search(r"# the tests \(what \.ci/run calls\)\n(.+)\n", README.read_text()).group(1)
    assert command.strip() in ci
