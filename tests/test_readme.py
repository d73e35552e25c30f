"""The README's Python examples run, in order, in one namespace."""
import pathlib
import re
import textwrap

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python examples"
    namespace: dict = {}
    for block in blocks:
        # a block inside a list item is indented with it
        exec(compile(textwrap.dedent(block), str(README), "exec"), namespace)  # noqa: S102
