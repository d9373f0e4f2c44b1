"""The README's examples run as written: its Python block executes, its command lines parse with
the real command-line parsers, and every option it names in prose is one some command has."""
import argparse
import re
import shlex
from pathlib import Path

import pytest

from mlvicx_fast import evaluate, train
from mlvicx_fast.data import prepare

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PARSERS = {"mlvicx_fast.train": train.build_parser, "mlvicx_fast.evaluate": evaluate.build_parser,
           "mlvicx_fast.data.prepare": prepare.build_parser}
# options of other programs the README names: setup.sh, pip, torchrun, the benchmark scripts
EXTERNAL = {"--dev", "--help", "--index-url", "--nproc-per-node", "--nnodes", "--rdzv-backend",
            "--rdzv-endpoint", "--rdzv-id", "--max-restarts", "--quick", "--run", "--arch"}


def blocks(lang):
    return re.findall(rf"^```{lang}\n(.*?)^```", README, re.S | re.M)


def command_lines():
    """The `python -m mlvicx_fast...` lines of the bash blocks, continuation lines joined."""
    lines = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()  # an aligned comment after the command
            if line.startswith("python -m mlvicx_fast") and "..." not in line:
                lines.append(line)
    return lines


def option_strings(parser):
    opts = set()
    for action in parser._actions:
        opts.update(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                opts |= option_strings(sub)
    return opts


def no_abbreviations(parser):
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                no_abbreviations(sub)


def test_python_example_runs(capsys):
    (code,) = blocks("python")
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    loss, terms, z1 = scope["loss"], scope["terms"], scope["z1"]
    assert loss.dim() == 0 and bool(loss.isfinite())
    assert set(terms) == {"inv", "var", "cov"}
    assert z1.grad is not None and z1.grad.abs().sum() > 0  # the first loss's backward ran


@pytest.mark.parametrize("line", command_lines())
def test_command_lines_parse(line):
    argv = shlex.split(line)
    module = argv[2]
    assert module in PARSERS, f"README names an unknown command module {module!r}"
    parser = PARSERS[module]()
    no_abbreviations(parser)  # a README option must be spelled out, not a prefix argparse accepts
    try:
        parser.parse_args(argv[3:])
    except SystemExit as e:
        pytest.fail(f"README line does not parse ({e}): {line}")


def test_the_commands_are_found():
    modules = {shlex.split(line)[2] for line in command_lines()}
    assert modules == set(PARSERS), modules  # the test above did see every command's examples


def test_every_option_in_the_prose_exists():
    known = set(EXTERNAL)
    for build in PARSERS.values():
        known |= option_strings(build())
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", README))
    assert named - known == set(), f"README names options no command has: {sorted(named - known)}"


def test_every_environment_variable_is_read_somewhere():
    named = set(re.findall(r"\bMLVICX_[A-Z0-9_]+", README))
    sources = [p for d in ("mlvicx_fast", "benchmarks", "scripts", "tests") for p in (ROOT / d).rglob("*")
               if p.suffix in (".py", ".sh") and p.name != "test_readme.py"]
    text = "\n".join(p.read_text() for p in sources)
    unread = sorted(v for v in named if v not in text)
    assert named and not unread, f"README names variables nothing reads: {unread}"
