"""The repository as a user runs it from its root: `python -m ...` and `python -m pytest` put the current
folder first on `sys.path`, so nothing at the top of the repository may shadow an installed distribution.

transformers 5.25 imports the hub's `kernels` distribution; a top-level `kernels/` package of ours was found
first and broke every model load from the root. The rule is checked for every top-level name, not only
`kernels`: a new dependency can bring the next clash.
"""
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
OWN = "regiondrag"  # the one importable top-level name: our own distribution's


def from_root(code: str) -> subprocess.CompletedProcess:
    """`python -c CODE` from the repository root: the root is first on sys.path, as with `python -m`."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def top_level_names() -> list[str]:
    names = []
    for entry in REPO.iterdir():
        if entry.name.startswith(".") or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir() or entry.suffix == ".py":
            names.append(entry.stem if entry.is_file() else entry.name)
    return sorted(names)


def test_no_top_level_name_is_a_package_or_module_of_the_repository_but_ours():
    """From the root, `find_spec(name)` of any top-level folder or .py file must not give a regular package
    or module inside the repository (a folder without `__init__.py` is only a namespace portion, which any
    installed package of the same name wins over)."""
    names = top_level_names()
    assert OWN in names
    code = (
        "import importlib.util, json, sys\n"
        f"repo = {str(REPO)!r}\n"
        "found = {}\n"
        f"for name in {names!r}:\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    origin = spec.origin if spec else None\n"
        "    if origin and origin.startswith(repo):\n"
        "        found[name] = origin\n"
        "print(json.dumps(found))\n")
    r = from_root(code)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(found) == {OWN}, f"top-level names importable from the repository root: {found}"


@pytest.mark.parametrize("name", ["engine", "export", "kernels"])
def test_installed_subpackages_resolve_inside_regiondrag(name):
    r = from_root(f"import regiondrag.{name} as m; print(m.__file__)")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).parent == REPO / OWN / name


def test_installed_kernels_distribution_wins_from_the_root():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the `kernels` distribution is not installed (transformers < 5.25 does not need it)")
    r = from_root("import kernels; print(kernels.__file__)")
    assert r.returncode == 0, r.stderr
    assert not Path(r.stdout.strip()).resolve().is_relative_to(REPO), r.stdout


def readme_tiny_edit_command() -> list[str]:
    """The README's second setup command, the offline edit on the tiny model, as its words."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.startswith("python -m regiondrag.engine edit") and "tiny" in ln]
    assert lines, "README.md lost its `python -m regiondrag.engine edit ... --model tiny` command"
    return shlex.split(lines[0])


@pytest.mark.slow
def test_readme_edit_command_from_the_root(tmp_path):
    argv = readme_tiny_edit_command()
    assert argv[:3] == ["python", "-m", "regiondrag.engine"]
    out = tmp_path / "out.png"
    argv = [sys.executable] + argv[1:]
    argv[argv.index("--out") + 1] = str(out)
    env = dict(os.environ, REGIONDRAG_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    env.pop("REGIONDRAG_DEBUG", None)
    r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Image.open(out).size == Image.open(REPO / "examples" / "dog.png").size
    assert not re.search(r"CUDAProperties|Traceback", r.stderr)


@pytest.mark.slow
def test_built_wheel_holds_every_module_under_regiondrag(tmp_path):
    """The packaging maps the whole `regiondrag/` tree (subpackages included) and nothing else."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed (needed to build the wheel without network)")
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(REPO / OWN, src / OWN, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", str(src), "-w", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("regiondrag-*.whl")
    in_wheel = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    in_repo = {p.relative_to(REPO).as_posix() for p in (REPO / OWN).rglob("*.py") if "__pycache__" not in p.parts}
    assert in_wheel == in_repo
