"""The onnxruntime build each platform installs (pyproject markers, the Slicer module), one build per environment,
and the CPU units that make reduced precisions fast."""

import os
import re
import sys
from importlib import metadata

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from SHIVACMBLib import runtimes
from SHIVACMBLib.slicerside import slicerbridge
from helpers import REPO

# (sys_platform, platform_machine, python_version) of the platforms users have: Linux, Windows and macOS on x86-64,
# ARM Linux and Apple silicon, and the Pythons of Slicer 5.8 (3.9) and 5.10 (3.12).
PLATFORMS = [("linux", "x86_64", "3.9"), ("linux", "x86_64", "3.10"), ("linux", "x86_64", "3.12"),
             ("linux", "aarch64", "3.12"), ("win32", "AMD64", "3.10"), ("win32", "AMD64", "3.12"),
             ("darwin", "x86_64", "3.12"), ("darwin", "arm64", "3.12")]


def cpu_extra():
    """The `cpu` extra of pyproject.toml, as pip reads it."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    return [Requirement(r) for r in re.findall(r'^    "([^"]+)",$', re.search(r"^cpu = \[\n(.*?)\n\]", text,
                                                                             re.S | re.M).group(1), re.M)]


def chosen(requirements, platform, machine, python):
    """The requirements pip installs on that platform: their names and version ranges."""
    environment = dict(default_environment(), sys_platform=platform, platform_machine=machine,
                       python_version=python, python_full_version=f"{python}.0")
    return sorted(f"{r.name}{r.specifier}" for r in requirements if r.marker is None or r.marker.evaluate(environment))


@pytest.mark.parametrize("platform, machine, python", PLATFORMS)
def test_the_cpu_extra_and_the_slicer_module_install_one_and_the_same_build(platform, machine, python):
    """onnxruntime-openvino where its wheels exist (x86-64 Linux from 3.10, Windows from 3.11 with OpenVINO's own
    package), onnxruntime's own kernels elsewhere; exactly one onnxruntime build everywhere."""
    extra = chosen(cpu_extra(), platform, machine, python)
    builds = [r for r in extra if r.startswith("onnxruntime")]
    assert len(builds) == 1, extra
    version = tuple(int(part) for part in python.split("."))
    openvino = (platform == "linux" and machine == "x86_64" and version >= (3, 10)) or \
        (platform == "win32" and version >= (3, 11))
    assert builds[0].startswith("onnxruntime-openvino" if openvino else "onnxruntime>=")
    assert any(r.startswith("openvino") for r in extra) == (openvino and platform == "win32")
    slicer = slicerbridge.onnxruntime_requirements(version, platform, machine, nvidia_gpu=False)
    if version < (3, 10):  # pip finds the last onnxruntime with wheels for 3.9 itself; the module names it
        assert slicer == [f"{builds[0]},<{slicerbridge.ONNXRUNTIME_PY39_LIMIT}"]
    else:
        assert sorted(str(Requirement(r)) for r in slicer) == extra


def test_an_nvidia_gpu_gets_the_gpu_build_on_linux_and_windows_only():
    assert slicerbridge.onnxruntime_requirements((3, 12), "linux", "x86_64", True) == ["onnxruntime-gpu>=1.16"]
    assert slicerbridge.onnxruntime_requirements((3, 9), "win32", "AMD64", True) == ["onnxruntime-gpu>=1.16,<1.20"]
    assert slicerbridge.onnxruntime_requirements((3, 12), "darwin", "arm64", True) == ["onnxruntime>=1.16"]


def test_this_environment_holds_the_build_its_markers_choose():
    """The environment the tests run in was made with the README's command: the `cpu` extra's build, no other."""
    here = default_environment()
    expected = [Requirement(r).name for r in chosen(cpu_extra(), here["sys_platform"], here["platform_machine"],
                                                    here["python_version"]) if r.startswith("onnxruntime")]
    installed = [build.split()[0] for build in runtimes.installed_builds()]
    if "onnxruntime-gpu" in installed:
        pytest.skip("the GPU build was installed instead (README, GPU)")
    assert installed == expected


def test_two_builds_in_one_environment_are_named_with_the_fix(monkeypatch):
    assert runtimes.builds_warning(["onnxruntime-openvino 1.24.1"]) is None
    versions = {"onnxruntime-openvino": "1.24.1", "onnxruntime": "1.32.0"}

    def version(name):
        if name not in versions:
            raise metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(metadata, "version", version)
    builds = runtimes.installed_builds()
    assert builds == ["onnxruntime-openvino 1.24.1", "onnxruntime 1.32.0"]
    warning = runtimes.builds_warning(builds)
    assert "onnxruntime-openvino 1.24.1 and onnxruntime 1.32.0 are installed in one environment" in warning
    assert "pip uninstall -y onnxruntime onnxruntime-openvino onnxruntime-gpu" in warning


@pytest.mark.parametrize("flags, int8, bf16", [
    ("fpu avx512f amx_bf16 amx_int8 amx_tile avx512_vnni", "AMX", "AMX"),
    ("fpu avx2 avx512f avx512_vnni avx512_bf16", "AVX-512 VNNI", "AVX-512 BF16"),
    ("fpu avx2 avx_vnni", "AVX-VNNI", None),
    ("fpu avx2 fma", None, None)])
def test_fast_units_are_read_from_the_cpu_flags(tmp_path, flags, int8, bf16):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n", encoding="utf-8")
    assert runtimes.fast_unit("int8", info) == int8 and runtimes.fast_unit("bf16", info) == bf16
    assert runtimes.cpu_has_bf16(info) is (bf16 is not None)
    assert runtimes.fast_precisions(info) == {k: v for k, v in (("int8", int8), ("bf16", bf16)) if v}


def test_a_cpu_the_os_does_not_describe_offers_nothing_and_leaves_bf16_to_openvino(tmp_path):
    missing = tmp_path / "missing"
    assert runtimes.fast_precisions(missing) == {} and runtimes.cpu_has_bf16(missing) is True


def test_openvino_libraries_are_found_in_the_openvino_package(tmp_path, monkeypatch):
    """What onnxruntime-openvino's Windows wheel needs on the DLL search path; nothing to do on Linux."""
    assert runtimes.openvino_libraries() is None or runtimes.openvino_libraries().name == "libs"
    package = tmp_path / "site" / "openvino"
    (package / "libs").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "openvino", raising=False)
    assert runtimes.openvino_libraries() == package / "libs"
    path = os.environ.get("PATH")
    runtimes.load_openvino_libraries()
    assert os.environ.get("PATH") == path or sys.platform == "win32"
