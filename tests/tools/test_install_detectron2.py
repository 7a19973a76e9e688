"""Decisions of tools/install_detectron2.py, tested without touching the real environment."""

import importlib.util
import io
import os
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "install_detectron2.py"


@pytest.fixture(scope="module")
def installer():
    spec = importlib.util.spec_from_file_location("install_detectron2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up in sys.modules while the class is created.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_working_detectron2_is_left_untouched(installer, monkeypatch):
    calls = []
    monkeypatch.setattr(
        installer, "probe_detectron2",
        lambda python: installer.ProbeResult("working", "0.6", "/somewhere/detectron2"),
    )
    monkeypatch.setattr(installer, "download_sdist", lambda *a, **k: calls.append("download"))
    monkeypatch.setattr(installer, "install_source", lambda *a, **k: calls.append("install"))

    assert installer.install(sys.executable) == "skipped"
    assert calls == []


def test_probe_finds_this_environment_working(installer):
    result = installer.probe_detectron2(sys.executable)

    assert result.status == "working"
    assert result.version.startswith("0.6")


def test_probe_reports_missing_detectron2(installer, tmp_path):
    # An interpreter started with -I and an empty sys.path finds no site-packages.
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
    wrapper.chmod(0o755)

    result = installer.probe_detectron2(str(wrapper))

    assert result.status == "missing"


def test_broken_detectron2_is_not_replaced_without_force(installer, monkeypatch):
    monkeypatch.setattr(
        installer, "probe_detectron2",
        lambda python: installer.ProbeResult("broken", detail="ImportError: cannot import X"),
    )

    with pytest.raises(installer.InstallError, match="cannot import X"):
        installer.install(sys.executable)


def _write_tarball(path: Path, payload: bytes) -> None:
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo("pb1-detectron2-0.6/setup.py")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))


def test_tarball_with_wrong_checksum_is_rejected(installer, monkeypatch, tmp_path):
    sdist = tmp_path / installer.SDIST_FILENAME
    _write_tarball(sdist, b"print('not detectron2')\n")
    installed = []
    monkeypatch.setattr(
        installer, "probe_detectron2", lambda python: installer.ProbeResult("missing")
    )
    monkeypatch.setattr(installer, "install_source", lambda *a: installed.append(a))

    with pytest.raises(installer.ChecksumError) as raised:
        installer.install(sys.executable, sdist=sdist)

    assert str(sdist) in str(raised.value)
    assert installer.SDIST_SHA256 in str(raised.value)
    assert installed == []


def test_unreachable_registry_gives_clear_error(installer, tmp_path, monkeypatch):
    # Port 9 on loopback has no listener, so pip fails at once; no configuration file is read,
    # so no other index or local wheel folder can satisfy the request.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    pip_args = ["--index-url", "http://127.0.0.1:9/simple", "--retries", "0", "--timeout", "2"]

    with pytest.raises(installer.InstallError) as raised:
        installer.download_sdist(sys.executable, tmp_path / "download", pip_args)

    message = str(raised.value)
    assert "could not download pb1-detectron2==0.6" in message
    assert "reachable" in message


def test_source_edit_that_does_not_match_is_rejected(installer, tmp_path):
    target = tmp_path / "detectron2" / "x.py"
    target.parent.mkdir()
    target.write_text("nothing to replace here\n")
    edit = installer.SourceEdit("detectron2/x.py", "np.int)", "int)", 1, "test")

    with pytest.raises(installer.InstallError, match="expected 1 occurrence"):
        installer.apply_source_edits(tmp_path, [edit])
