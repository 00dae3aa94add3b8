"""Our W8A8 kernel (`tdllm.model.avx512_kernel`): its product is the exact integer product, on
every shape a model has and the odd ones it might; and, the attack first, the library it builds
runs inside the TD, so it is never loaded from a directory someone else could write to."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from tdllm.cli import main
from tdllm.errors import ModelLoadError
from tdllm.model import avx2_kernel, avx512_kernel, kernel_build
from tdllm.model.cpu_features import HAS_AMX, cpu_flags
from tdllm.model.w8a8_packed import X_STEP, X_ZERO
from tests.cpu_kernels import needs_avx512


def exact(rounded: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """What the kernel must give, in float64 from the integer sums."""
    sums = (rounded.double() - X_ZERO) @ q.double().T  # exact: |sum| < 2^53
    return sums * X_STEP * scales.double()


@needs_avx512
@pytest.mark.parametrize(
    ("rows", "n", "k"),
    [(1, 64, 64), (1, 1000, 1003), (5, 192, 576), (6, 130, 7), (7, 64, 256), (13, 65, 100),
     (64, 300, 2048), (33, 70, 130), (0, 64, 64)],
)  # fmt: skip
@pytest.mark.parametrize(
    "amx_min_rows",
    [0, pytest.param(1, marks=pytest.mark.skipif(not HAS_AMX, reason="no AMX on this CPU"))],
    ids=["vnni", "amx"],
)
def test_the_kernel_gives_the_exact_integer_product(
    rows: int, n: int, k: int, amx_min_rows: int
) -> None:
    avx512_kernel.load()
    g = torch.Generator().manual_seed(rows * 7919 + n * 31 + k)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, generator=g) / 50
    packed = avx512_kernel.pack(q)
    padded_n = packed.shape[0] * packed.shape[2]
    sums = torch.zeros(padded_n, dtype=torch.int32)
    sums[:n] = q.sum(1, dtype=torch.int32)
    assert torch.equal(avx512_kernel.row_sums(q, padded_n), sums)
    staged = torch.cat([q, torch.zeros(n, 2, dtype=torch.int8)], 1)  # as W8A8 stages its rows
    assert torch.equal(avx512_kernel.row_sums(staged[:, :-2], padded_n), sums)
    padded_scales = torch.zeros(padded_n)
    padded_scales[:n] = scales
    # the rows as W8A8 hands them over: in [-1, 1], two range columns after them (ignored)
    x = (torch.rand(rows, k + 2, generator=g) * 2 - 1) * (127 / 127.5)
    x[:, :3] = torch.tensor([127 / 127.5, -127 / 127.5, 0.5 / 127.5])  # the ends, a tie
    y = avx512_kernel.product(x, packed, padded_scales, sums, n, k, X_STEP, amx_min_rows)
    rounded = torch.round(x[:, :k] * (1 / X_STEP)) + X_ZERO
    assert y.shape == (rows, n)
    expected = exact(rounded, q, scales)
    bound = 1e-6 * max(1.0, float(expected.abs().max())) if rows else 0.0
    assert torch.allclose(y.double(), expected, rtol=1e-6, atol=bound)
    assert torch.equal(avx512_kernel.unpack(packed, n, k), q)


@needs_avx512
def test_a_row_gives_the_same_result_alone_and_in_any_batch() -> None:
    """Whatever path a batch's size picks (VNNI, AMX from `AMX_MIN_ROWS`): the same int32
    sums, the same float scaling, so a request's result does not depend on who else is in it."""
    avx512_kernel.load()
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (128, 96), dtype=torch.int8, generator=g)
    packed = avx512_kernel.pack(q)
    sums, scales = q.sum(1, dtype=torch.int32), torch.rand(128, generator=g)
    x = torch.rand(40, 96, generator=g) * 2 - 1
    together = avx512_kernel.product(x, packed, scales, sums, 128, 96, X_STEP)
    for r in range(40):
        alone = avx512_kernel.product(x[r : r + 1], packed, scales, sums, 128, 96, X_STEP)
        assert torch.equal(alone[0], together[r])


def test_a_kernel_directory_others_can_write_to_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "kernels"
    shared.mkdir()
    shared.chmod(0o777)  # another user could swap the library between build and load
    with pytest.raises(ModelLoadError, match="not this user's alone"):
        kernel_build.build_directory({"TDLLM_KERNEL_DIR": str(shared)})
    shared.chmod(0o775)
    with pytest.raises(ModelLoadError, match="not this user's alone"):
        kernel_build.build_directory({"TDLLM_KERNEL_DIR": str(shared)})


def test_a_kernel_directory_that_is_a_link_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    link = tmp_path / "kernels"
    link.symlink_to(target)
    with pytest.raises(ModelLoadError, match="is not a directory"):
        kernel_build.build_directory({"TDLLM_KERNEL_DIR": str(link)})


@pytest.mark.skipif(os.getuid() != 0, reason="giving a directory to another user needs root")
def test_a_kernel_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "kernels"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 1, 1)
    with pytest.raises(ModelLoadError, match="owner uid 1"):
        kernel_build.build_directory({"TDLLM_KERNEL_DIR": str(theirs)})


def test_the_default_kernel_directory_is_created_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel_build.tempfile, "gettempdir", lambda: str(tmp_path))
    path = kernel_build.build_directory({})
    assert path.parent == tmp_path and stat.S_IMODE(path.stat().st_mode) == 0o700


def test_the_kernel_asks_for_the_cpu_flags_it_uses(tmp_path: Path) -> None:
    intel = tmp_path / "intel"
    intel.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n")
    assert avx512_kernel.missing_cpu_flags(cpu_flags(intel)) == []
    zen3 = tmp_path / "zen3"
    zen3.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    missing = avx512_kernel.missing_cpu_flags(cpu_flags(zen3))
    assert missing == ["avx512f", "avx512bw", "avx512_vnni"]
    assert avx512_kernel.missing_cpu_flags(cpu_flags(tmp_path / "absent")) == missing
    assert avx2_kernel.missing_cpu_flags(cpu_flags(zen3)) == ["f16c"]  # as written above
    zen3.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma f16c\n")
    assert avx2_kernel.missing_cpu_flags(cpu_flags(zen3)) == []
    assert avx2_kernel.missing_cpu_flags(cpu_flags(tmp_path / "absent")) == ["avx2", "fma", "f16c"]


@pytest.mark.parametrize(
    ("quant", "vnni", "avx2", "error"),
    [
        ("w8a8-avx512", True, True, "needs AVX-512 VNNI; this CPU lacks avx512_vnni: use w8a8"),
        # no VNNI at all (an AVX2 CPU): FBGEMM's W8A8 neither
        ("w8a8-avx512", False, True, "needs AVX-512 VNNI; this CPU lacks avx512_vnni: use int8"),
        (
            "w4a8-avx512",
            False,
            True,
            "needs AVX-512 VNNI; this CPU lacks avx512_vnni: use w4a8 (our AVX2 kernel)",
        ),
        ("w4a8-avx512", False, False, "needs AVX-512 VNNI; this CPU lacks avx512_vnni: use int4"),
        ("w4a8", False, False, "needs AVX2; this CPU lacks avx2: use int4"),
    ],
)
def test_a_quant_on_our_kernels_without_the_instructions_is_one_line_before_any_weight(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    quant: str,
    vnni: bool,
    avx2: bool,
    error: str,
) -> None:
    monkeypatch.setattr(avx512_kernel, "missing_cpu_flags", lambda: ["avx512_vnni"])
    monkeypatch.setattr(avx512_kernel, "HAS_VNNI", vnni)
    monkeypatch.setattr(avx512_kernel, "_build", avx512_kernel._build.__wrapped__)
    monkeypatch.setattr(avx2_kernel, "missing_cpu_flags", lambda: [] if avx2 else ["avx2"])
    monkeypatch.setattr(avx2_kernel, "_build", avx2_kernel._build.__wrapped__)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--quant", quant, "--max-tokens", "2", "Hi"])
    assert exit_info.value.code == ModelLoadError.exit_code
    assert capsys.readouterr().err == f"error: quant {quant} {error}\n"


def test_a_missing_compiler_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(avx512_kernel, "missing_cpu_flags", lambda: [])
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TDLLM_KERNEL_DIR", str(tmp_path / "kernels"))
    with pytest.raises(
        ModelLoadError, match=r"needs a C\+\+ compiler and ninja .*not found: .*no-such-compiler"
    ):
        avx512_kernel.load()  # not yet built in this process: the check comes first
    assert not (tmp_path / "kernels").exists()  # nothing built, nothing created


def test_doctor_says_what_emulated_bf16_costs_where_the_cpu_lacks_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tdllm import doctor

    monkeypatch.setattr(doctor, "cpu_flags", lambda: {"avx2", "fma", "f16c"})  # an AVX2 EPYC
    row = dict(doctor.report())["bf16 matmul"]
    assert row.startswith("emulated: prompts widened to fp32") and "prefer fp32" not in row
    monkeypatch.setattr(doctor, "cpu_flags", lambda: {"avx2", "avx512f", "amx_bf16"})
    assert dict(doctor.report())["bf16 matmul"] == "native (AVX512-BF16/AMX)"


def test_doctor_lists_the_quants_this_cpu_loads_and_why_the_others_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tdllm import doctor

    monkeypatch.setattr(avx512_kernel, "missing_cpu_flags", lambda: ["avx512f"])
    monkeypatch.setattr(avx2_kernel, "why_unavailable", lambda: None)
    monkeypatch.setattr(doctor, "HAS_VNNI", False)  # an AVX2 EPYC
    assert doctor.quant_support() == (
        "int8, int4 (its head int8 weight-only: no VNNI), w8a8-avx2, w4a8; refused here: "
        "w8a8, w8a8-onednn (no VNNI); w8a8-avx512, w4a8-avx512 (avx512 kernels)"
    )
    monkeypatch.setattr(doctor, "HAS_VNNI", True)  # AVX-VNNI without AVX-512
    monkeypatch.setattr(avx2_kernel, "why_unavailable", lambda: "no compiler")
    assert doctor.quant_support() == (
        "int8, int4, w8a8, w8a8-onednn; refused here: w8a8-avx512, w4a8-avx512 (avx512 "
        "kernels); w8a8-avx2, w4a8 (avx2 kernels)"
    )
    monkeypatch.setattr(avx512_kernel, "why_unavailable", lambda: None)
    monkeypatch.setattr(avx2_kernel, "why_unavailable", lambda: None)
    assert doctor.quant_support().endswith("w8a8-onednn, w8a8-avx512, w4a8-avx512, w8a8-avx2, w4a8")
    assert "quants" in dict(doctor.report())


def test_doctor_says_whether_the_kernel_can_be_built(monkeypatch: pytest.MonkeyPatch) -> None:
    from tdllm import doctor

    monkeypatch.setattr(avx512_kernel, "missing_cpu_flags", lambda: ["avx512_vnni"])
    monkeypatch.setattr(avx512_kernel, "HAS_VNNI", True)  # AVX-VNNI without AVX-512's
    rows = dict(doctor.report())
    assert rows["avx512 kernels"].endswith("this CPU lacks avx512_vnni: use w8a8")
    monkeypatch.setattr(avx512_kernel, "missing_cpu_flags", lambda: [])
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    assert "not found: c++, ninja" in dict(doctor.report())["avx512 kernels"]
