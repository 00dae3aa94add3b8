"""configfs-tsm quote provider against a FAKE kernel: real files in tmp_path, kernel side faked.

`FakeTsmKernel` plays the kernel's part of the ABI: it populates a new entry, bumps `generation`
on each inblob write and fills `outblob` when it is read. No TDX guest is involved.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tdllm_attest.quote import ConfigfsOps, ConfigfsTsmProvider, QuoteProviderError

REPORT_DATA = bytes(range(64))


@dataclass
class FakeTsmKernel(ConfigfsOps):
    provider: str = "tdx_guest"
    busy_reads: int = 0  # outblob reads that fail with EBUSY first
    races: int = 0  # reads during which a concurrent writer bumps generation
    empty: bool = False
    entries_made: list[Path] = field(default_factory=list)

    def mkdir(self, path: Path) -> None:
        super().mkdir(path)
        self.entries_made.append(path)
        (path / "provider").write_text(self.provider + "\n")
        (path / "generation").write_text("0\n")

    def write(self, path: Path, data: bytes) -> None:
        if path.name == "inblob" and len(data) != 64:
            raise OSError(errno.EINVAL, "tdx_guest wants exactly 64 bytes")
        super().write(path, data)
        self._bump(path.parent)

    def read(self, path: Path) -> bytes:
        if path.name == "outblob":
            if self.busy_reads:
                self.busy_reads -= 1
                raise OSError(errno.EBUSY, "Device or resource busy")
            if self.races:
                self.races -= 1
                self._bump(path.parent)
            inblob = (path.parent / "inblob").read_bytes()
            path.write_bytes(b"" if self.empty else b"QUOTE:" + inblob)
        return super().read(path)

    def rmdir(self, path: Path) -> None:
        for child in path.iterdir():  # configfs removes attributes itself
            child.unlink()
        super().rmdir(path)

    @staticmethod
    def _bump(entry: Path) -> None:
        gen = entry / "generation"
        gen.write_text(f"{int(gen.read_text()) + 1}\n")


def _provider(root: Path, kernel: FakeTsmKernel, sleeps: list[float]) -> ConfigfsTsmProvider:
    return ConfigfsTsmProvider(
        root=root, attempts=3, backoff_s=0.01, sleep=sleeps.append, ops=kernel
    )


def test_fake_kernel_quote_carries_the_report_data_and_the_entry_is_removed(
    tmp_path: Path,
) -> None:
    kernel, sleeps = FakeTsmKernel(), list[float]()
    quote = _provider(tmp_path, kernel, sleeps).get_quote(REPORT_DATA)
    assert quote == b"QUOTE:" + REPORT_DATA
    assert list(tmp_path.iterdir()) == []
    assert sleeps == []


def test_wrong_provider_is_refused_and_cleaned_up(tmp_path: Path) -> None:
    kernel = FakeTsmKernel(provider="sev_guest")
    with pytest.raises(QuoteProviderError, match="sev_guest"):
        _provider(tmp_path, kernel, []).get_quote(REPORT_DATA)
    assert list(tmp_path.iterdir()) == []


def test_generation_change_by_a_concurrent_writer_is_retried(tmp_path: Path) -> None:
    kernel, sleeps = FakeTsmKernel(races=1), list[float]()
    assert _provider(tmp_path, kernel, sleeps).get_quote(REPORT_DATA).endswith(REPORT_DATA)
    assert len(kernel.entries_made) == 2
    assert len(sleeps) == 1
    assert list(tmp_path.iterdir()) == []


def test_ebusy_is_retried_with_growing_back_off_then_succeeds(tmp_path: Path) -> None:
    kernel, sleeps = FakeTsmKernel(busy_reads=2), list[float]()
    assert _provider(tmp_path, kernel, sleeps).get_quote(REPORT_DATA).endswith(REPORT_DATA)
    assert sleeps == [0.01, 0.02]


def test_persistent_ebusy_gives_a_clear_error_after_bounded_retries(tmp_path: Path) -> None:
    kernel, sleeps = FakeTsmKernel(busy_reads=100), list[float]()
    with pytest.raises(QuoteProviderError, match="after 3 tries: EBUSY"):
        _provider(tmp_path, kernel, sleeps).get_quote(REPORT_DATA)
    assert len(kernel.entries_made) == 3
    assert len(sleeps) == 2
    assert list(tmp_path.iterdir()) == []


def test_endless_generation_races_give_up_after_bounded_retries(tmp_path: Path) -> None:
    kernel = FakeTsmKernel(races=100)
    with pytest.raises(QuoteProviderError, match="concurrent writer"):
        _provider(tmp_path, kernel, []).get_quote(REPORT_DATA)
    assert list(tmp_path.iterdir()) == []


def test_empty_outblob_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(QuoteProviderError, match="empty outblob"):
        _provider(tmp_path, FakeTsmKernel(empty=True), []).get_quote(REPORT_DATA)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size", [0, 32, 63, 65])
def test_report_data_must_be_exactly_64_bytes(tmp_path: Path, size: int) -> None:
    kernel = FakeTsmKernel()
    with pytest.raises(QuoteProviderError, match="exactly 64"):
        _provider(tmp_path, kernel, []).get_quote(bytes(size))
    assert kernel.entries_made == []


def test_missing_configfs_is_an_error_not_a_simulated_fallback(tmp_path: Path) -> None:
    provider = ConfigfsTsmProvider(root=tmp_path / "absent", sleep=lambda _s: None)
    with pytest.raises(QuoteProviderError, match="cannot create"):
        provider.get_quote(REPORT_DATA)
