"""The `tdllm` command finds the lab's commands through its entry point, and without the lab (the
TD image) names them and says how to install it; the core never imports the lab."""

from __future__ import annotations

import importlib.metadata

import pytest

from tdllm.cli import LAB_COMMANDS, main


def test_the_core_names_exactly_the_labs_commands() -> None:
    from tdllm_lab.cli import COMMANDS

    assert sorted(c.name for c in COMMANDS if c.name) == sorted(LAB_COMMANDS)


def test_with_the_lab_installed_its_commands_run(capsys: pytest.CaptureFixture[str]) -> None:
    main(["bench", "--help"])  # help returns (no exit) under standalone_mode=False
    assert "unseal" in capsys.readouterr().out


@pytest.mark.parametrize("name", LAB_COMMANDS)
def test_without_the_lab_a_lab_command_says_how_to_install_it(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **_: [])
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: `tdllm {name}` is a lab tool, not part of the TD image")
    assert "tdllm-lab" in err and err.count("\n") == 1


def test_a_lab_that_cannot_load_leaves_the_core_working_and_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = importlib.metadata.EntryPoint("lab", "tdllm_lab_gone.cli:COMMANDS", "tdllm.commands")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **_: [broken])
    main(["--help"])
    listed = capsys.readouterr().out
    assert "generate" in listed and "attack" not in listed
    with pytest.raises(SystemExit) as done:
        main(["attack", "A1"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "tdllm-lab is installed but cannot be loaded" in err and "tdllm_lab_gone" in err
