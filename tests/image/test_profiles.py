"""Each image profile's service config, as the tdllm_service role renders it, is one the service
accepts; a sealed model's broker key is pinned in it; the smoke image pins the key its test's
broker signs with. Fast: no Ansible, no build (the template is rendered with jinja2 here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml  # type: ignore[import-untyped]

from tdllm.settings import ALLOW_SIMULATED_ENV, load_settings
from tdllm_attest.broker.signing import load_broker_public_key, public_pem
from tests.image.conftest import ANSIBLE_DIR, IMAGE_DIR
from tests.image.smoke_keys import smoke_broker_key

ROLE = ANSIBLE_DIR / "roles" / "tdllm_service"
PROFILES = ("prod", "dev", "smoke")


def _yaml(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _profile(name: str) -> dict[str, Any]:
    """The role's defaults with the profile's variables over them (as the build passes them)."""
    return _yaml(ROLE / "defaults" / "main.yml") | _yaml(IMAGE_DIR / "profiles" / f"{name}.yml")


def _render_service_toml(variables: dict[str, Any], dest: Path) -> Path:
    """templates/service.toml.j2 as Ansible's template module renders it (trim_blocks)."""
    env = jinja2.Environment(trim_blocks=True, autoescape=False, undefined=jinja2.StrictUndefined)  # noqa: S701 - TOML
    env.filters["to_json"] = json.dumps
    template = env.from_string((ROLE / "templates" / "service.toml.j2").read_text())
    dest.write_text(template.render(**variables), encoding="utf-8")
    return dest


@pytest.mark.parametrize("name", PROFILES)
def test_the_profiles_service_config_is_one_the_service_accepts(name: str, tmp_path: Path) -> None:
    variables = _profile(name)
    environ = {str(k): str(v) for k, v in variables["tdllm_service_environment"].items()}
    assert environ.get(ALLOW_SIMULATED_ENV, "0") == ("1" if name == "smoke" else "0")
    rendered = _render_service_toml(variables, tmp_path / "service.toml")
    settings = load_settings(rendered, environ=environ)
    assert settings.sealed and settings.key_id and settings.min_model_version >= 1
    # what the role's assert demands of a sealed model: the pinned key, where the role puts it
    assert settings.broker_public_key == variables["tdllm_service_broker_public_key_path"]


def test_the_smoke_image_pins_the_key_its_tests_broker_signs_with() -> None:
    pem = _profile("smoke")["tdllm_service_broker_public_key"].encode()
    load_broker_public_key(pem)
    assert pem == public_pem(smoke_broker_key())


@pytest.mark.parametrize("name", ["prod", "dev"])
def test_a_release_profile_takes_the_broker_key_from_the_build(name: str) -> None:
    """prod and dev pin no key themselves: build.sh passes IMAGE_BROKER_PUBLIC_KEY, before the
    profile's variables so that a profile (smoke) can override it."""
    assert _profile(name)["tdllm_service_broker_public_key"] == ""
    conf = (IMAGE_DIR / "image.conf").read_text()
    assert "\nIMAGE_BROKER_PUBLIC_KEY=" in conf
    script = (IMAGE_DIR / "build.sh").read_text()
    command = script[script.index('"$ANSIBLE_PLAYBOOK"') :]
    assert command.index("@$WORK/broker-key.json") < command.index("image/profiles/$PROFILE.yml")
