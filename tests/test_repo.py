"""Repository invariants: CI runs the README's test command, and the set-up script's options."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands(text):
    return [line.strip() for line in text.splitlines() if line.strip().startswith("bash scripts/setup.sh")]


def test_ci_runs_the_readme_test_command():
    readme = _commands((ROOT / "README.md").read_text())
    ci = _commands((ROOT / ".ci" / "run").read_text())
    assert len(ci) == 1, ci
    assert ci[0] in readme, f"{ci[0]!r} is not one of the README's commands {readme}"
    assert len(readme) == 2, f"the README must show exactly two commands, found {readme}"


def test_setup_script_help_and_bad_option():
    ok = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "--dev" in ok.stdout
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--gpu"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option '--gpu'" in bad.stderr


def test_gpu_check_default_stages_are_its_stage_lines_in_order():
    """gpu_check.sh's default STAGES list names every stage line, in the order they run: a stage
    missing from the list would never run in the one device call a session gets."""
    import re

    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    default = re.search(r'^STAGES=\$\{STAGES:-"([^"]*)"\}', script, re.M)
    assert default, "no default STAGES line in gpu_check.sh"
    lines = re.findall(r"^stage (\w+) \d+ ", script, re.M)
    assert lines and default.group(1).split() == lines, (default.group(1).split(), lines)
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)
