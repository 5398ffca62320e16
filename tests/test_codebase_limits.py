"""Limits that keep the code a newcomer can carry (issue 9): no source file of the product over 600
lines. (Complexity <= 15 per function is ruff's C901, run by .ci/run; import cycles are
tests/test_import_graph.py's.)"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 600


def test_no_product_file_is_over_600_lines():
    files = [p for pkg in ("service", "worker", "gradtune") for p in (ROOT / pkg).rglob("*.py")]
    assert len(files) > 50  # the scan found the packages
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in files}
    over = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not over, f"over {MAX_LINES} lines: {over}"
