"""Shared fixtures: where the real sample data and the reference test vectors are."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES_ENV = "SKYSENSE_SAMPLES"


def _samples_dir() -> Path:
    configured = os.environ.get(SAMPLES_ENV)
    if configured:
        return Path(configured)
    return REPO_ROOT.parent / "shared" / "data" / "rs_samples"


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The folder of real sample images (dubai_aerial, loveda, isprs_potsdam, demo)."""
    path = _samples_dir()
    if not (path / "dubai_aerial" / "classes.json").is_file():
        pytest.skip(
            f"sample data not found at {path}; set {SAMPLES_ENV} to the rs_samples folder "
            "(the one holding dubai_aerial/, loveda/, isprs_potsdam/ and demo/)"
        )
    return path


@pytest.fixture(scope="session")
def class_lists_dir(samples_dir: Path) -> Path:
    """The folder of benchmark class lists that sits beside the samples."""
    path = samples_dir.parent / "class_lists"
    if not path.is_dir():
        pytest.skip(f"class lists not found at {path}")
    return path


@pytest.fixture(scope="session")
def refspec_dir() -> Path:
    """The reference specification of the released model, with its test vectors."""
    configured = os.environ.get("SKYSENSE_REFSPEC")
    path = Path(configured) if configured else REPO_ROOT.parent / "shared" / "refspec"
    if not (path / "vectors").is_dir():
        pytest.skip(f"reference vectors not found at {path}; set SKYSENSE_REFSPEC")
    return path
