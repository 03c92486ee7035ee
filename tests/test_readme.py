"""README.md's commands run as written: every repository script its `bash` blocks invoke exists,
answers `--help`, and lists every flag the README passes it; every `make` target exists; and the
README stays a README (at most 300 lines, about 25 KB; the two commands on the first screen).

Only `--help` runs, every script's in one interpreter, so this stays fast."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
MAX_LINES, MAX_BYTES = 300, 25 * 1024
FIRST_SCREEN_LINES = 30
SCRIPT = re.compile(r"(?:\./)?((?:train_\w+|infer|serve)\.py|(?:experiments|benchmarks)/\w+\.py)")
CONSOLE_COMMANDS = {
    "safety-classifier-train-lora": "train_lora.py",
    "safety-classifier-train-qlora": "train_qlora.py",
    "safety-classifier-train-full-layers": "train_full_layers.py",
    "safety-classifier-infer": "infer.py",
    "safety-classifier-serve": "serve.py",
}
RUNNERS = {"python", "python3", ".venv/bin/python", "torchrun", "accelerate"}
SEPARATORS = {"&&", "||", ";", "|"}
FLAG = re.compile(r"(--[A-Za-z0-9][A-Za-z0-9_-]*)(?:=|$)")


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.S | re.M)


def command_lines(block: str) -> list[list[str]]:
    """Each command of a block as its words: continuation lines joined, comments dropped, and
    lines split at `&&`, `||`, `;` and `|`."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        command = []
        for word in lexer:
            if word in SEPARATORS:
                commands.append(command)
                command = []
            else:
                command.append(word)
        commands.append(command)
    return [command for command in commands if command]


def script_invocation(command: list[str]) -> tuple[str, list[str]] | None:
    """(script, the flags passed to it) when the command runs a repository script, else None."""
    words = list(command)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # VAR=value before the program
        words.pop(0)
    if not words:
        return None
    if words[0] in CONSOLE_COMMANDS:
        script, arguments = CONSOLE_COMMANDS[words[0]], words[1:]
    elif words[0] in RUNNERS or words[0].endswith("/python"):
        if "-m" in words[:2]:
            return None  # a module (pytest, pip ...), not a repository script
        position = next((i for i, word in enumerate(words) if SCRIPT.fullmatch(word)), None)
        if position is None:
            return None
        script, arguments = SCRIPT.fullmatch(words[position]).group(1), words[position + 1:]
    elif SCRIPT.fullmatch(words[0]):
        script, arguments = SCRIPT.fullmatch(words[0]).group(1), words[1:]
    else:
        return None
    flags = [match.group(1) for word in arguments if (match := FLAG.match(word))]
    return script, flags


def make_targets(command: list[str]) -> list[str]:
    if command[0] != "make":
        return []
    return [word for word in command[1:] if not word.startswith("-") and "=" not in word]


def readme_commands() -> list[list[str]]:
    return [command for block in bash_blocks(README.read_text()) for command in command_lines(block)]


def flags_by_script() -> dict[str, set[str]]:
    scripts: dict[str, set[str]] = {}
    for command in readme_commands():
        invocation = script_invocation(command)
        if invocation is not None:
            scripts.setdefault(invocation[0], set()).update(invocation[1])
    return scripts


SCRIPTS = flags_by_script()


# Runs each script as `python SCRIPT --help` would (as __main__, its directory first on sys.path),
# all in one interpreter, so that torch and transformers are imported once for all of them.
HELP_RUNNER = """
import contextlib, io, json, runpy, sys
answers = {}
for script in sys.argv[1:]:
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [script, "--help"]
    sys.path.insert(0, script.rpartition("/")[0] or ".")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException as error:  # a script that cannot even start
        code, err = 1, io.StringIO(err.getvalue() + repr(error))
    finally:
        sys.path.pop(0)
    answers[script] = {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def help_texts() -> dict[str, dict]:
    """`--help` of every script the README runs: {script: {"returncode", "stdout", "stderr"}}, wide
    enough not to wrap."""
    environment = {**os.environ, "COLUMNS": "1000", "HF_HUB_OFFLINE": "1"}
    existing = sorted(script for script in SCRIPTS if (REPO_ROOT / script).is_file())
    result = subprocess.run([sys.executable, "-c", HELP_RUNNER, *existing], cwd=REPO_ROOT, env=environment,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"the --help runner failed:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_readme_is_short_and_shows_the_two_commands_first():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_LINES, f"README.md has {len(text.splitlines())} lines (at most {MAX_LINES})"
    assert len(text.encode()) <= MAX_BYTES, f"README.md has {len(text.encode()):,} bytes (at most {MAX_BYTES:,})"
    first_screen = "\n".join(text.splitlines()[:FIRST_SCREEN_LINES])
    assert "make demo" in first_screen and "make test" in first_screen, "the two commands belong on the first screen"


def test_the_commands_are_read_as_a_shell_would():
    block = ('python train_lora.py --train-file a.csv \\\n    --output-dir runs/x --lora-r=8  # --not-a-flag\n'
             'make demo DATA=/data && HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests\n'
             'torchrun --nproc_per_node=2 train_qlora.py --model m | tee log\n'
             'python benchmarks/serve_ab.py --a-flags "--return-wait-share 0"\n'
             'safety-classifier-infer --model-dir runs/x\n')
    commands = command_lines(block)
    assert [script_invocation(command) for command in commands] == [
        ("train_lora.py", ["--train-file", "--output-dir", "--lora-r"]), None, None,
        ("train_qlora.py", ["--model"]), None, ("benchmarks/serve_ab.py", ["--a-flags"]), ("infer.py", ["--model-dir"])]
    assert make_targets(commands[1]) == ["demo"]


def test_the_readme_runs_repository_scripts():
    assert {"train_lora.py", "infer.py", "serve.py"} <= set(SCRIPTS), "the quickstart trains, scores and serves"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_flag_the_readme_passes_a_script_is_in_its_help(script, help_texts):
    assert (REPO_ROOT / script).is_file(), f"README.md runs {script}, which does not exist"
    result = help_texts[script]
    assert result["returncode"] == 0, f"python {script} --help failed:\n{result['stderr'][-2000:]}"
    unknown = sorted(flag for flag in SCRIPTS[script]
                     if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result["stdout"]))
    assert not unknown, f"README.md passes {script} flags its --help does not list: {', '.join(unknown)}"


def test_every_make_target_in_the_readme_exists():
    makefile = (REPO_ROOT / "Makefile").read_text()
    defined = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", makefile, flags=re.M))
    used = {target for command in readme_commands() for target in make_targets(command)}
    assert {"demo", "test"} <= used, "the README shows the two commands"
    assert not used - defined, f"README.md runs make targets the Makefile lacks: {sorted(used - defined)}"
