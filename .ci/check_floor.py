"""Fail unless the floor environment is at the floor: every lower bound that pyproject.toml declares for the
dependencies and the test extra is pinned in .ci/floor-constraints.txt, and that version is what is installed."""

from __future__ import annotations

import importlib.metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def pinned() -> dict[str, Version]:
    lines = (ROOT / ".ci" / "floor-constraints.txt").read_text().splitlines()
    pairs = (line.split("==") for line in lines if "==" in line and not line.startswith("#"))
    return {canonicalize_name(name): Version(version.strip()) for name, version in pairs}


def declared_floors() -> dict[str, Version]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors: dict[str, Version] = {}
    for text in project["dependencies"] + project["optional-dependencies"]["test"]:
        requirement = Requirement(text)
        if requirement.marker and not requirement.marker.evaluate():
            continue  # e.g. tomli, only below Python 3.11
        lows = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
        if lows:
            floors[canonicalize_name(requirement.name)] = max(lows)
    return floors


def main() -> int:
    pins, floors = pinned(), declared_floors()
    problems = [f"{name}: pyproject.toml says >={floor}, floor-constraints.txt pins {pins.get(name)}"
                for name, floor in floors.items() if pins.get(name) != floor]
    for name, version in pins.items():
        installed = Version(importlib.metadata.version(name)).base_version  # 2.7.0+cu126 is 2.7.0
        if Version(installed) != version:
            problems.append(f"{name}: {installed} is installed, the floor is {version}")
    for problem in problems:
        print(f"floor environment: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
