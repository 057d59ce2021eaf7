import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).parents[1] / "docs"


def test_docs_build_without_warnings(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    html = (tmp_path / "html" / "api.html").read_text()
    assert "daskrecon.distribute" in html and "reduction_plan" in html
    assert (tmp_path / "html" / "auto_examples" / "plot_multiblur_pnp.html").exists()


def test_the_conda_environment_has_every_dependency_pyproject_installs_for_the_tests():
    """README: "environment.yml gives conda users the same dependencies" (core and test extras)."""
    import re
    import tomllib

    import yaml

    root = Path(__file__).parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((root / "environment.yml").read_text())["dependencies"]
    listed = [d for d in env if isinstance(d, str)] + [p for d in env if isinstance(d, dict) for p in d.get("pip", [])]

    def name(req: str) -> str:
        return re.split(r"[\[<>=!~ ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")

    conda_names = {"torch": "pytorch"}
    have = {name(r) for r in listed}
    missing = [r for r in project["dependencies"] + project["optional-dependencies"]["test"]
               if conda_names.get(name(r), name(r)) not in have]
    assert not missing, f"environment.yml lacks {missing}"
