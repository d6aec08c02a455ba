"""The documents say what the code does: the README's supported-models table is the family registry's, every
Python block of the README runs as written (tiny offline pipelines standing in where a block says so), and every
test `docs/errors.md` cites exists."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_supported_models_table_is_the_registry():
    from vlhooks.models import supported_table

    assert supported_table() in README, "regenerate the README table with vlhooks.models.supported_table()"


def test_errors_doc_cites_tests_that_exist():
    doc = (ROOT / "docs" / "errors.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| ") and not line.startswith("| bad input")]
    rows = [r for r in rows if not set(r) <= set("|- ")]
    assert len(rows) >= 40
    cited = set(re.findall(r"`(test_\w+\.py)(?:::(test_\w+))?", doc))
    assert cited
    for file, name in cited:
        path = ROOT / "tests" / file
        assert path.is_file(), file
        if name:
            names = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
            assert name in names, f"{file}::{name}"


def _blocks(text: str) -> list[tuple[str, str, str | None]]:
    """`(language, code, skip reason or None)` of every fenced block, in order."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w+)\s*$", lines[i])
        if m:
            prev = lines[i - 1] if i else ""
            skip = re.match(r"^<!-- ci: skip \((.+)\) -->$", prev)
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            out.append((m.group(1), "\n".join(lines[i + 1:j]), skip.group(1) if skip else None))
            i = j
        i += 1
    return out


def _ci_version(code: str) -> str:
    """Each line ending in `# ci: X` becomes `X` at that line's indentation (tiny stand-ins for downloads)."""
    out = []
    for line in code.splitlines():
        m = re.match(r"^(\s*)(.*?)\s+# ci: (.+)$", line)
        out.append(m.group(1) + m.group(3) if m else line)
    return "\n".join(out)


@pytest.mark.slow
def test_readme_code_blocks_run_as_written(tmp_path, monkeypatch):
    """Every Python and shell block runs, in order, in a fresh folder (Python blocks share one namespace, like a
    session); only blocks marked `<!-- ci: skip (why) -->` are skipped, each with its reason."""
    import os
    import subprocess

    blocks = _blocks(README)
    skipped = [b for b in blocks if b[2] is not None]
    assert len(skipped) <= 3 and all(reason.strip() for _, _, reason in skipped)
    for name in (".venv", "configs", "checkpoints"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    ran = {"python": 0, "bash": 0}
    for lang, code, skip in blocks:
        if skip is not None or lang not in ran:
            continue
        if lang == "python":
            exec(compile(_ci_version(code), "README.md", "exec"), namespace)
        else:
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=900)
            assert r.returncode == 0, f"{code}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
        ran[lang] += 1
    assert ran["python"] >= 5 and ran["bash"] >= 2
