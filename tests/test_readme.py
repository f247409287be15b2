"""The README's Python blocks run as written, in order, in one session (a user's copy-and-paste)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text):
    """The ```python blocks of a Markdown text, with the line each starts on."""
    return [(text[: m.start()].count("\n") + 2, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def test_the_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 7
    monkeypatch.chdir(tmp_path)  # they write out/, logs/ and backup/ where they run
    (tmp_path / "experiments").symlink_to(README.parent / "experiments")  # they read experiment files from there
    namespace = {"__name__": "__readme__"}
    for line, code in blocks:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 (the README's own code)
    assert (tmp_path / "out" / "model.tflite").is_file() and (tmp_path / "out" / "model.compression.json").is_file()
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))  # keras.callbacks.TensorBoard wrote its log
