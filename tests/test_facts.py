"""Facts written once: where a second copy must stay (the YAML schema, the conda environment),
it agrees with the one statement; aggregation reads the column names without importing torch."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from segpipe.columns import AXES, DEFINITIONS

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())


def test_the_schema_lists_the_axes_of_segpipe_columns():
    properties = SCHEMA["properties"]
    assert list(DEFINITIONS) == list(AXES)
    assert properties["defaults"]["required"] == list(AXES)
    assert [key for key in properties["defaults"]["properties"] if key != "seeds"] == list(AXES)
    experiment = properties["experiments"]["additionalProperties"]["properties"]
    assert list(experiment["vary"]["properties"]) == list(AXES)
    assert list(experiment["set"]["properties"]) == list(AXES)
    for section in DEFINITIONS.values():
        assert section in SCHEMA["required"]
        assert properties[section]["$ref"] == "#/$defs/definitions"


def test_aggregation_does_not_import_torch():
    code = ("import sys, segpipe.aggregate, segpipe.summary; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_the_start_checks_import_neither_numpy_nor_torch():
    """The Snakemake process may run without them (--sdm conda): what common.smk imports."""
    code = ("import sys, segpipe.files, segpipe.data.groups, segpipe.spec, segpipe.columns, "
            "segpipe.labels, segpipe.figures, segpipe.rundir; "
            "assert not {'numpy', 'torch'} & set(sys.modules), 'numpy or torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def _requirement(text: str) -> tuple[str, str]:
    """(normalised name without extras, version specifier) of a PEP 508 requirement."""
    name, specifier = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?\s*(.*)", text).groups()
    return name.lower().replace("_", "-"), specifier.replace(" ", "")


def test_conda_env_pins_the_dependencies_of_pyproject():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((REPO / "envs" / "segpipe.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    # The jobs run segpipe only; snakemake is the runner's, outside the jobs' environment.
    expected = dict(map(_requirement, pyproject["dependencies"]))
    del expected["snakemake"]
    assert dict(map(_requirement, pip)) == expected
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    minimum = re.fullmatch(r">=(\d+)\.(\d+)", pyproject["requires-python"]).groups()
    assert tuple(map(int, python.removeprefix("python=").split("."))) >= tuple(map(int, minimum))
