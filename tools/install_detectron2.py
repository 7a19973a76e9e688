#!/usr/bin/env python3
"""Install Detectron2 0.6 from the package index when no working Detectron2 is importable.

Detectron2 is not published on the package index under its own name. The index does hold
``pb1-detectron2==0.6``, a source distribution whose Python files are those of the official
v0.6 tag, but it cannot be installed as it is: its C++ sources are missing while its
``setup.py`` always builds the ``detectron2._C`` extension. Semantic segmentation needs none
of the compiled ops (rotated boxes, deformable convolution, the fast COCO evaluator), so this
script installs the Python package alone, as the distribution ``detectron2 0.6+nocsrc``.

What it does, in order:

1. Probe the target interpreter. A Detectron2 whose ``modeling``, ``data`` and ``evaluation``
   modules import is left untouched, whatever its origin (an official build, a wheel, or an
   earlier run of this script). One that is installed but fails to import is reported and
   left untouched unless ``--force`` is given.
2. Download the source distribution with pip and check its SHA-256.
3. Unpack it and apply the edits listed in ``SOURCE_EDITS``, each one needed because v0.6
   predates the current NumPy and Pillow or expects the compiled extension.
4. Replace ``setup.py`` by one that builds no extension and names the distribution
   ``detectron2`` with the local version ``0.6+nocsrc``, so ``pip list`` and bug reports say
   what is installed.
5. Install it with pip (without dependencies: ``require.txt`` lists them) and probe again.

Run it with the interpreter of the environment to install into, for example
``.venv/bin/python tools/install_detectron2.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

logger = logging.getLogger("install_detectron2")

SDIST_REQUIREMENT = "pb1-detectron2==0.6"
SDIST_FILENAME = "pb1-detectron2-0.6.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
INSTALLED_VERSION = "0.6+nocsrc"

# pip 25 and later reject any distribution on the index whose metadata declares a direct URL
# dependency, and pb1-detectron2 declares one in its optional "all" extra. When the
# environment's pip refuses for that reason, the download is retried with this older pip,
# installed into a temporary folder that is deleted afterwards.
FALLBACK_PIP = "pip==24.2"
DIRECT_URL_REFUSAL = "cannot declare direct URL dependencies"

PROBE_CODE = (
    "import detectron2, detectron2.modeling, detectron2.data, detectron2.evaluation\n"
    "print(detectron2.__version__)\n"
    "print(detectron2.__file__)\n"
)

OFFICIAL_ROUTE = (
    "With access to GitHub, the official route is: "
    "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'"
)


class InstallError(RuntimeError):
    """A step of the installation failed; the message names the step and what to do."""


class ChecksumError(InstallError):
    """The downloaded source distribution is not the one this script was written for."""


@dataclasses.dataclass(frozen=True)
class SourceEdit:
    """A literal text replacement applied to one file of the unpacked source."""

    path: str
    old: str
    new: str
    count: int
    reason: str


_OPTIONAL_C_IMPORT = (
    "try:\n"
    "    from detectron2 import _C\n"
    "except ImportError:\n"
    "    # Installed as 0.6+nocsrc, without the compiled ops; calling one of them fails.\n"
    "    _C = None\n"
)

SOURCE_EDITS: List[SourceEdit] = [
    # 1. The compiled extension is absent, and these modules import it at module level, so
    #    `import detectron2.modeling` (and the evaluation package) would fail outright.
    *[
        SourceEdit(
            path=path,
            old="from detectron2 import _C\n",
            new=_OPTIONAL_C_IMPORT,
            count=1,
            reason="import the absent compiled extension lazily",
        )
        for path in (
            "detectron2/layers/deform_conv.py",
            "detectron2/layers/rotated_boxes.py",
            "detectron2/layers/roi_align_rotated.py",
            "detectron2/evaluation/fast_eval_api.py",
        )
    ],
    # 2. Pillow 10 removed the alias Image.LINEAR; Image.BILINEAR is the same filter.
    SourceEdit(
        path="detectron2/data/transforms/transform.py",
        old="interp=Image.LINEAR",
        new="interp=Image.BILINEAR",
        count=1,
        reason="Pillow 10 removed Image.LINEAR",
    ),
    # 3. NumPy 1.24 removed the aliases np.int, np.float and np.bool of the builtin types.
    SourceEdit("detectron2/evaluation/sem_seg_evaluation.py", "dtype=np.int)", "dtype=int)", 2,
               "NumPy 1.24 removed np.int"),
    SourceEdit("detectron2/evaluation/sem_seg_evaluation.py", "dtype=np.float)", "dtype=float)",
               2, "NumPy 1.24 removed np.float"),
    SourceEdit("detectron2/evaluation/sem_seg_evaluation.py", ".astype(np.float)",
               ".astype(float)", 3, "NumPy 1.24 removed np.float"),
    SourceEdit("detectron2/data/build.py", "dtype=np.int)", "dtype=int)", 1,
               "NumPy 1.24 removed np.int"),
    SourceEdit("detectron2/data/build.py", "dtype=np.int\n", "dtype=int\n", 1,
               "NumPy 1.24 removed np.int"),
    SourceEdit("detectron2/structures/masks.py", ".astype(np.bool)", ".astype(bool)", 2,
               "NumPy 1.24 removed np.bool"),
    SourceEdit("detectron2/structures/masks.py", "dtype=np.bool)", "dtype=bool)", 1,
               "NumPy 1.24 removed np.bool"),
    SourceEdit("detectron2/utils/visualizer.py", ".astype(np.bool)", ".astype(bool)", 3,
               "NumPy 1.24 removed np.bool"),
    SourceEdit("detectron2/utils/video_visualizer.py", "dtype=np.bool)", "dtype=bool)", 1,
               "NumPy 1.24 removed np.bool"),
    SourceEdit("detectron2/evaluation/pascal_voc_evaluation.py", ".astype(np.bool)",
               ".astype(bool)", 2, "NumPy 1.24 removed np.bool"),
]

# The replacement setup.py. It keeps the package layout of the original (the three projects
# are installed under detectron2.projects) and drops the extension build. Dependencies are
# not declared: this project's require.txt installs them, with bounds that fit NumPy 2.
SETUP_PY = '''\
from setuptools import find_packages, setup

PROJECTS = {{
    "detectron2.projects.point_rend": "projects/PointRend/point_rend",
    "detectron2.projects.deeplab": "projects/DeepLab/deeplab",
    "detectron2.projects.panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}}

setup(
    name="detectron2",
    version="{version}",
    description="Detectron2 0.6 (Python package only, without the compiled C++/CUDA ops)",
    packages=find_packages(exclude=("configs", "tests*", "projects*")) + list(PROJECTS),
    package_dir=PROJECTS,
    python_requires=">=3.8",
)
'''


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """Outcome of importing Detectron2 in the target interpreter."""

    status: str  # "working", "missing" or "broken"
    version: str = ""
    location: str = ""
    detail: str = ""


def probe_detectron2(python: str) -> ProbeResult:
    """Import Detectron2's main modules in a fresh ``python`` process and report the result."""
    completed = subprocess.run(
        [python, "-c", PROBE_CODE], capture_output=True, text=True, check=False
    )
    if completed.returncode == 0:
        version, location = (completed.stdout.strip().splitlines() + ["", ""])[:2]
        return ProbeResult("working", version=version, location=location)
    stderr = completed.stderr.strip()
    last_line = stderr.splitlines()[-1] if stderr else f"exit status {completed.returncode}"
    if re.search(r"No module named '?detectron2'?$", last_line):
        return ProbeResult("missing", detail=last_line)
    return ProbeResult("broken", detail=last_line)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksum(path: Path, expected: str = SDIST_SHA256) -> None:
    """Raise ChecksumError unless ``path`` has the SHA-256 ``expected``."""
    actual = sha256_of(path)
    if actual != expected:
        raise ChecksumError(
            f"{path} has SHA-256 {actual}, but {SDIST_REQUIREMENT} is expected to have "
            f"{expected}. The file was not installed. Delete it and run this script again; if "
            "the index serves a changed file, install Detectron2 another way. " + OFFICIAL_ROUTE
        )


def _pip_download_command(python: str, dest: Path, pip_args: Sequence[str]) -> List[str]:
    # Preparing the metadata of this sdist runs its setup.py, which imports torch, so the
    # download must see the environment's torch: hence no build isolation.
    return [
        python, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
        "--no-binary", ":all:", "--dest", str(dest), *pip_args, SDIST_REQUIREMENT,
    ]


def _run_logged(command: Sequence[str], env: Optional[dict] = None) -> subprocess.CompletedProcess:
    logger.info("running: %s", " ".join(command))
    return subprocess.run(command, capture_output=True, text=True, check=False, env=env)


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def download_sdist(python: str, dest: Path, pip_args: Sequence[str] = ()) -> Path:
    """Download the source distribution into ``dest`` with pip and return its path.

    ``pip_args`` are passed to pip as they are (for example an ``--index-url``).
    """
    dest.mkdir(parents=True, exist_ok=True)
    completed = _run_logged(_pip_download_command(python, dest, pip_args))
    if completed.returncode != 0 and DIRECT_URL_REFUSAL in completed.stderr:
        logger.info(
            "this pip rejects the sdist's metadata (a direct URL in an optional extra); "
            "retrying with %s from a temporary folder", FALLBACK_PIP,
        )
        completed = _download_with_fallback_pip(python, dest, pip_args)
    if completed.returncode != 0:
        raise InstallError(
            f"could not download {SDIST_REQUIREMENT} with pip (exit status "
            f"{completed.returncode}). pip output:\n{_tail(completed.stderr or completed.stdout)}\n"
            "Check that the package index is reachable (network, proxy, pip configuration), "
            "or pass a downloaded copy with --sdist. " + OFFICIAL_ROUTE
        )
    path = dest / SDIST_FILENAME
    if not path.is_file():
        raise InstallError(f"pip reported success but {path} does not exist")
    return path


def _download_with_fallback_pip(
    python: str, dest: Path, pip_args: Sequence[str]
) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="skysense-pip-") as pip_home:
        installed = _run_logged(
            [python, "-m", "pip", "install", "--quiet", "--target", pip_home, *pip_args,
             FALLBACK_PIP]
        )
        if installed.returncode != 0:
            return installed
        env = dict(os.environ, PYTHONPATH=pip_home)
        return _run_logged(_pip_download_command(python, dest, pip_args), env=env)


def unpack(sdist: Path, dest: Path) -> Path:
    """Unpack ``sdist`` into ``dest`` and return the source root (the folder with setup.py)."""
    with tarfile.open(sdist, "r:gz") as archive:
        archive.extractall(dest, filter="data")
    roots = [path.parent for path in dest.glob("*/setup.py")]
    if len(roots) != 1:
        raise InstallError(f"{sdist} does not contain exactly one top-level setup.py")
    return roots[0]


def apply_source_edits(source_root: Path, edits: Sequence[SourceEdit] = SOURCE_EDITS) -> None:
    """Apply ``edits`` in place; raise InstallError if a file does not read as expected."""
    for edit in edits:
        path = source_root / edit.path
        text = path.read_text(encoding="utf-8")
        found = text.count(edit.old)
        if found != edit.count:
            raise InstallError(
                f"expected {edit.count} occurrence(s) of {edit.old.strip()!r} in {edit.path}, "
                f"found {found}; this script only knows the v0.6 source"
            )
        path.write_text(text.replace(edit.old, edit.new), encoding="utf-8")
        logger.info("edited %s: %s", edit.path, edit.reason)
    (source_root / "setup.py").write_text(SETUP_PY.format(version=INSTALLED_VERSION))
    logger.info("replaced setup.py: no compiled extension, version %s", INSTALLED_VERSION)


def install_source(python: str, source_root: Path) -> None:
    command = [python, "-m", "pip", "install", "--no-deps", str(source_root)]
    logger.info("running: %s", " ".join(command))
    # pip's own progress goes straight to the terminal here, because the build can take a
    # minute and a silent step looks hung.
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0:
        raise InstallError(f"pip could not install the edited source (exit {completed.returncode})")


def install(
    python: str,
    *,
    force: bool = False,
    sdist: Optional[Path] = None,
    pip_args: Sequence[str] = (),
) -> str:
    """Make a working Detectron2 importable in ``python``; return what was done.

    Returns "skipped" when a working Detectron2 was found and "installed" otherwise.
    """
    found = probe_detectron2(python)
    if found.status == "working" and not force:
        logger.info(
            "Detectron2 %s already works at %s; leaving it untouched", found.version,
            found.location,
        )
        return "skipped"
    if found.status == "broken" and not force:
        raise InstallError(
            "a Detectron2 is installed but does not import: "
            f"{found.detail}\nIt was left untouched. Repair or uninstall it "
            "(pip uninstall detectron2), or run this script with --force to replace it."
        )

    with tempfile.TemporaryDirectory(prefix="skysense-d2-") as work:
        work_dir = Path(work)
        if sdist is None:
            logger.info("downloading %s with pip", SDIST_REQUIREMENT)
            sdist = download_sdist(python, work_dir / "download", pip_args)
        verify_checksum(sdist)
        logger.info("checksum of %s verified", sdist.name)
        source_root = unpack(sdist, work_dir / "source")
        apply_source_edits(source_root)
        install_source(python, source_root)

    after = probe_detectron2(python)
    if after.status != "working":
        raise InstallError(f"Detectron2 was installed but still does not import: {after.detail}")
    logger.info("Detectron2 %s installed at %s", after.version, after.location)
    return "installed"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter of the environment to install into (default: this one)")
    parser.add_argument("--force", action="store_true",
                        help="install even when a Detectron2 is already present")
    parser.add_argument("--sdist", type=Path, default=None,
                        help=f"use this local copy of {SDIST_FILENAME} instead of downloading it")
    args, pip_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="[install_detectron2] %(message)s")
    try:
        install(args.python, force=args.force, sdist=args.sdist, pip_args=pip_args)
    except InstallError as error:
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
