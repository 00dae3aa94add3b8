"""IMAGE_ENGINE=vllm: the engine goes from make through build.sh into the playbook and the signed
reference values; the vLLM venv comes from the wheelhouse only; the settings the role writes name
vLLM's venv and are ones the service accepts. Fast: no build, no chroot (Ansible runs only
against localhost to render and validate)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jinja2
import pytest
import yaml  # type: ignore[import-untyped]
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tdllm.settings import load_settings
from tests.image.conftest import ANSIBLE_DIR, IMAGE_DIR, REPO, ansible_env

SERVICE_ROLE = ANSIBLE_DIR / "roles" / "tdllm_service"
VLLM_ROLE = ANSIBLE_DIR / "roles" / "vllm_runtime"
PLAYBOOK = ANSIBLE_DIR / "playbooks" / "image.yml"
PROFILES = ("prod", "dev", "smoke")
ROOT_HASH = "cd" * 32


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _play() -> dict[str, Any]:
    (play,) = _yaml(PLAYBOOK)
    assert isinstance(play, dict)
    return play


def _role_entry(name: str) -> dict[str, Any]:
    (entry,) = [r for r in _play()["roles"] if r["role"] == name]
    assert isinstance(entry, dict)
    return entry


def _vllm_python() -> str:
    """What image.yml gives the tdllm_service role for the vllm engine, resolved."""
    venv = _play()["vars"]["tdllm_image_vllm_venv"]
    python = _role_entry("tdllm_service")["vars"]["tdllm_service_vllm_python"]
    assert python == "{{ tdllm_image_vllm_venv }}/bin/python"
    return f"{venv}/bin/python"


def _variables(profile: str, engine: str) -> dict[str, Any]:
    """tdllm_service's defaults, the profile's variables over them, then image.yml's engine."""
    variables: dict[str, Any] = _yaml(SERVICE_ROLE / "defaults" / "main.yml")
    variables |= _yaml(IMAGE_DIR / "profiles" / f"{profile}.yml")
    return variables | {"tdllm_service_engine": engine, "tdllm_service_vllm_python": _vllm_python()}


def _render(variables: dict[str, Any]) -> str:
    """service.toml.j2 as Ansible's template module renders it (trim_blocks), in plain Jinja."""
    env = jinja2.Environment(trim_blocks=True, autoescape=False, undefined=jinja2.StrictUndefined)  # noqa: S701 - TOML
    env.filters["to_json"] = json.dumps
    return env.from_string((SERVICE_ROLE / "templates" / "service.toml.j2").read_text()).render(
        **variables
    )


def _run(argv: list[Any], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, **kwargs)


# --- (a) make and build.sh pass the engine through, and refuse an unknown one ---------------


@pytest.mark.parametrize(("engine", "expected"), [(None, "tdllm"), ("vllm", "vllm")])
def test_make_image_passes_the_engine_to_build_sh(engine: str | None, expected: str) -> None:
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    argv = ["make", "-n", "-s", "image", "IMAGE_PROFILE=smoke"]
    if engine is not None:
        argv.append(f"IMAGE_ENGINE={engine}")
    result = _run(argv, cwd=REPO, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert f"image/build.sh --profile smoke --engine {expected}" in result.stdout.splitlines()


@pytest.mark.parametrize("engine", ["vllm-cuda", "", "VLLM"])
def test_build_refuses_an_unknown_engine_with_one_line(engine: str) -> None:
    result = _run([IMAGE_DIR / "build.sh", "--profile", "smoke", "--engine", engine])
    assert result.returncode == 1
    assert result.stderr == f"error: engine must be tdllm or vllm, not '{engine}'\n"
    assert not (IMAGE_DIR / "out" / f"smoke-{engine}").exists()


def test_build_sh_hands_the_engine_to_the_playbook_and_the_signed_values() -> None:
    script = (IMAGE_DIR / "build.sh").read_text()
    playbook = script[script.index('"$ANSIBLE_PLAYBOOK"') :]
    playbook = playbook[: playbook.index("image.yml")]
    assert '-e "tdllm_image_engine=$ENGINE"' in playbook
    assert '-e "tdllm_image_vllm_venv=$VLLM_VENV"' in playbook
    assert "VLLM_VENV=/opt/tdllm/vllm-venv\n" in script  # under /opt: inside the verity root
    sign = script[script.index('"$REPO/image/refvalues.py" sign') :]
    assert '--engine "$ENGINE"' in sign[: sign.index("--out")]
    # a vLLM image lands beside the default one, never over it
    assert 'NAME="$PROFILE-$ENGINE"' in script and 'DEST="$OUT/$NAME"' in script


def test_the_vllm_wheelhouse_holds_only_pinned_wheels_and_installs_offline() -> None:
    script = (IMAGE_DIR / "build.sh").read_text()
    download = script[script.index("pip --disable-pip-version-check download") :]
    download = download[: download.index("\n  ", download.index("requirements.txt"))]
    for flag in ("--no-deps", "--only-binary=:all:", '-r "$REPO/service/vllm/requirements.txt"'):
        assert flag in download
    requirements = (REPO / "service" / "vllm" / "requirements.txt").read_text().splitlines()
    pins = [line for line in requirements if line and not line.startswith("#")]
    assert pins and all("==" in line and not line.startswith("-") for line in pins)

    tasks = _yaml(VLLM_ROLE / "tasks" / "main.yml")
    pips = [t["ansible.builtin.pip"] for t in tasks if "ansible.builtin.pip" in t]
    assert len(pips) == 2
    for pip in pips:
        assert pip["virtualenv"] == "{{ vllm_runtime_venv }}"
        args = pip["extra_args"]
        assert "--no-deps" in args.split() and "--no-index" in args.split()
        assert "--find-links {{ vllm_runtime_wheelhouse }}" in args
    defaults = _yaml(VLLM_ROLE / "defaults" / "main.yml")
    assert defaults["vllm_runtime_packages"] == ["tdllm", "tdllm-attest", "tdllm-vllm"]
    assert defaults["vllm_runtime_venv"].startswith("/opt/")
    entry = _role_entry("vllm_runtime")
    assert entry["when"] == "tdllm_image_engine == 'vllm'"
    assert entry["vars"]["vllm_runtime_venv"] == "{{ tdllm_image_vllm_venv }}"


def test_the_vllm_drop_in_relaxes_only_what_vllm_needs() -> None:
    """Measured under an emulation of the unit's filters (docs/image.md): vLLM's CPU worker runs
    lscpu at every start, which exits 1 without /proc/cpuinfo (ProcSubset=pid hides it); ZeroMQ
    aborts vLLM when sched_setscheduler is refused; gloo fails without AF_NETLINK. The drop-in
    changes exactly that, and the unit still refuses the rest of those groups and families."""
    unit = (REPO / "service" / "deploy" / "tdllm.service").read_text().splitlines()
    assert "ProcSubset=pid" in unit and "RestrictRealtime=yes" in unit
    refused = [line for line in unit if line.startswith("SystemCallFilter=~")]
    assert refused and "@resources" in refused[0]
    dropin = _yaml(VLLM_ROLE / "defaults" / "main.yml")["vllm_runtime_unit_dropin"]
    settings = [line for line in dropin.splitlines() if line and not line.startswith("#")]
    assert settings == [
        "[Service]",
        "ProcSubset=all",
        "SystemCallFilter=sched_setscheduler",
        "RestrictAddressFamilies=AF_NETLINK",
    ]
    assert "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX" in unit


# --- (b) the settings the role writes for the vllm engine ------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_vllm_settings_load_and_name_the_image_venv(profile: str, tmp_path: Path) -> None:
    variables = _variables(profile, "vllm")
    environ = {str(k): str(v) for k, v in variables["tdllm_service_environment"].items()}
    rendered = tmp_path / "service.toml"
    rendered.write_text(_render(variables), encoding="utf-8")
    settings = load_settings(rendered, environ=environ)
    assert settings.engine == "vllm"
    assert settings.vllm_python == "/opt/tdllm/vllm-venv/bin/python"
    # no C++ compiler in the image: vLLM must not compile its graph (docs/image.md)
    assert settings.vllm_args == ("--enforce-eager",)
    # the rest of the profile is untouched: the same sealed boot through the pinned broker
    assert settings.sealed and settings.broker_public_key == "/etc/tdllm/broker-public-key.pem"
    assert settings.attestation == ("simulated" if profile == "smoke" else "tdx")


def test_a_profiles_own_vllm_args_win(tmp_path: Path) -> None:
    variables = _variables("prod", "vllm")
    variables["tdllm_service_settings"] |= {"vllm_args": ["--max-num-batched-tokens=512"]}
    rendered = tmp_path / "service.toml"
    rendered.write_text(_render(variables), encoding="utf-8")
    settings = load_settings(rendered, environ={})
    assert settings.vllm_args == ("--max-num-batched-tokens=512",)
    assert settings.engine == "vllm"


@pytest.mark.parametrize("profile", PROFILES)
def test_the_default_engine_renders_the_settings_as_before(profile: str) -> None:
    """tdllm (the default): not one byte differs from rendering the profile's settings alone,
    so an image of the default engine keeps its service.toml (and its digests)."""
    variables = _variables(profile, "tdllm")
    before = (
        "# Managed by the tdllm_service role; part of the measured root filesystem.\n[service]\n"
    )
    before += "".join(
        f"{key} = {json.dumps(value)}\n"
        for key, value in sorted(variables["tdllm_service_settings"].items())
    )
    assert _render(variables) == before
    assert "engine" not in before and "vllm" not in before


# --- (c) Ansible itself: syntax with the vllm variables, argument specs, the real template ---


def _build_extra_vars(engine: str) -> list[str]:
    """The -e arguments image/build.sh passes (those that do not name build-time paths)."""
    return [
        *("-e", f"tdllm_image_engine={engine}", "-e", "tdllm_image_vllm_venv=/opt/tdllm/vllm-venv"),
        *("-e", "vllm_runtime_wheelhouse=/tmp/wheelhouse-vllm"),
        *("-e", "ml_runtime_wheelhouse=/tmp/wheelhouse"),
        *("-e", f"@{IMAGE_DIR / 'profiles' / 'prod.yml'}"),
    ]


def test_image_playbook_with_the_vllm_variables_passes_syntax_check(
    ansible_bin: Path, tmp_path: Path
) -> None:
    result = _run(
        [
            ansible_bin / "ansible-playbook",
            "--syntax-check",
            *("-i", ANSIBLE_DIR / "inventory" / "build-chroot.yml"),
            *_build_extra_vars("vllm"),
            PLAYBOOK,
        ],
        env=ansible_env(tmp_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ansible_renders_and_validates_the_vllm_variables(
    ansible_bin: Path, tmp_path: Path
) -> None:
    """On localhost: both roles' argument specs accept what image.yml gives them for vllm (and
    refuse an unknown engine), and Ansible's own template module writes the file the plain-Jinja
    render above checked."""
    play = _play()
    venv = play["vars"]["tdllm_image_vllm_venv"]
    engine_vars = tmp_path / "engine.yml"
    engine_vars.write_text(
        yaml.safe_dump(
            {
                "tdllm_service_engine": "vllm",
                "tdllm_service_vllm_python": f"{venv}/bin/python",
                "vllm_runtime_venv": venv,
            }
        )
    )
    playbook = tmp_path / "check.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Validate and render like image.yml",
                    "hosts": "localhost",
                    "gather_facts": False,
                    # image.yml gives these as role variables, over the roles' defaults
                    "vars_files": [
                        str(SERVICE_ROLE / "defaults" / "main.yml"),
                        str(VLLM_ROLE / "defaults" / "main.yml"),
                        str(IMAGE_DIR / "profiles" / "prod.yml"),
                        str(engine_vars),
                    ],
                    "tasks": [
                        {
                            "name": f"Validate {role}",
                            "ansible.builtin.validate_argument_spec": {
                                "argument_spec": _yaml(
                                    ANSIBLE_DIR / "roles" / role / "meta" / "argument_specs.yml"
                                )["argument_specs"]["main"]["options"]
                            },
                        }
                        for role in ("tdllm_service", "vllm_runtime")
                    ]
                    + [
                        {
                            "name": "Render",
                            "ansible.builtin.template": {
                                "src": str(SERVICE_ROLE / "templates" / "service.toml.j2"),
                                "dest": str(tmp_path / "service.toml"),
                                "mode": "0600",
                            },
                        }
                    ],
                }
            ]
        )
    )
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(
        "all:\n  hosts:\n    localhost:\n      ansible_connection: local\n"
        f"      ansible_python_interpreter: {ansible_bin / 'python'}\n"
    )
    base = [ansible_bin / "ansible-playbook", "-i", inventory, playbook]
    result = _run(base, env=ansible_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    by_ansible = (tmp_path / "service.toml").read_text()
    assert by_ansible == _render(_variables("prod", "vllm"))
    assert f'vllm_python = "{venv}/bin/python"\n' in by_ansible

    refused = _run([*base, "-e", "tdllm_service_engine=vllm-cuda"], env=ansible_env(tmp_path))
    assert refused.returncode != 0
    assert "tdllm_service_engine" in refused.stdout + refused.stderr


# --- (d) the engine is in what refvalues.py signs --------------------------------------------


@pytest.fixture
def artefacts(tmp_path: Path) -> Path:
    out = tmp_path / "prod-vllm"
    out.mkdir()
    for name in ("uki.efi", "vmlinuz", "initrd.img", "root.img", "packages.txt"):
        (out / name).write_bytes(f"{name} bytes".encode())
    (out / "python-packages.txt").write_text("tdllm==0.1.0\n")
    (out / "vllm-packages.txt").write_text("tdllm-vllm==0.1.0\nvllm-cpu==0.32.0\n")
    (out / "cmdline.txt").write_text(f"ro tdllm.verity=/dev/vda,8,32768,{ROOT_HASH}")
    return out


def _document(refvalues: ModuleType, artefacts: Path, **engine: str) -> dict[str, Any]:
    return refvalues.build_document(  # type: ignore[no-any-return]
        artefacts,
        profile="prod",
        verity_root_hash=ROOT_HASH,
        verity_salt="00" * 32,
        source_date_epoch=1735689600,
        commit="1" * 40,
        dirty=False,
        **engine,
    )


def test_the_signed_document_names_the_engine_and_its_venv_manifest(
    refvalues: ModuleType, artefacts: Path
) -> None:
    doc = _document(refvalues, artefacts, engine="vllm")
    assert doc["engine"] == "vllm"
    assert set(doc["manifests"]) == {"packages.txt", "python-packages.txt", "vllm-packages.txt"}
    key = Ed25519PrivateKey.generate()
    text = refvalues.sign_document(doc, key)
    assert refvalues.verify_document(text, key.public_key())["engine"] == "vllm"
    # a verifier cannot be told the other engine: the engine is under the signature
    tampered = text.replace('"engine": "vllm"', '"engine": "tdllm"')
    assert tampered != text
    with pytest.raises(refvalues.RefValuesError, match="signature"):
        refvalues.verify_document(tampered, key.public_key())

    default = _document(refvalues, artefacts)
    assert default["engine"] == "tdllm"
    assert set(default["manifests"]) == {"packages.txt", "python-packages.txt"}


def test_a_vllm_image_without_its_venv_manifest_is_refused(
    refvalues: ModuleType, artefacts: Path
) -> None:
    (artefacts / "vllm-packages.txt").unlink()
    with pytest.raises(refvalues.RefValuesError, match=r"vllm-packages\.txt"):
        _document(refvalues, artefacts, engine="vllm")
    with pytest.raises(refvalues.RefValuesError, match="engine must be one of"):
        _document(refvalues, artefacts, engine="vllm-cuda")


def test_policy_from_a_golden_boot_names_the_engine(refvalues: ModuleType, artefacts: Path) -> None:
    doc = _document(refvalues, artefacts, engine="vllm")
    golden = {
        "shape": "16 vCPU / 64 GiB",
        "uki_sha384": doc["artefacts"]["uki.efi"]["sha384"],
        "mr_td": "11" * 48,
        "rtmr0": "22" * 48,
        "rtmr1": "33" * 48,
        "rtmr2": "44" * 48,
        "xfam": "e702060000000000",
    }
    assert refvalues.policy_from_golden(doc, golden)["name"].startswith("prod+vllm@111111111111")
    old = {k: v for k, v in doc.items() if k != "engine"}  # signed before the option existed
    assert refvalues.engine_of(old) == "tdllm"


def test_cli_signs_the_engine_and_verify_reports_it(artefacts: Path, tmp_path: Path) -> None:
    script = [sys.executable, str(IMAGE_DIR / "refvalues.py")]
    out = artefacts / "reference-values.json"
    common = [
        *("sign", "--artefacts", artefacts, "--profile", "prod"),
        *("--verity-root-hash", ROOT_HASH, "--verity-salt", "00" * 32),
        *("--source-date-epoch", "1735689600", "--repo", tmp_path),
        *("--key", tmp_path / "dev.pem", "--create-dev-key", "--out", out),
    ]
    signed = _run([*script, *common, "--engine", "vllm"])
    assert signed.returncode == 0, signed.stderr
    assert json.loads(out.read_text())["policy"]["engine"] == "vllm"
    ok = _run(
        [*script, "verify", out, "--key-pub", out.with_suffix(".pub"), "--artefacts", artefacts]
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: prod image, engine vllm, commit ")

    bad = _run([*script, *common, "--engine", "vllm-cuda"])
    assert bad.returncode == 2
    assert "invalid choice: 'vllm-cuda'" in bad.stderr
