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
