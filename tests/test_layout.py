"""The package's layering and size rules (issue 46): the library never imports its command
line, one list of tokenizer types, modules stay readable, docstrings cite files that a user of
the repository has."""

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "sidserve"
ROOT = PKG.parent
MAX_LINES = 450
WHY = "Longer than 450 lines:"  # what a longer module's first lines must say


def modules():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions, absolute or relative."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def test_the_import_scan_sees_imports_inside_functions_and_relative_ones(tmp_path):
    pkg = tmp_path / "sidserve" / "jobs"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("def f():\n    from sidserve.cli import run_job\n\nfrom .. import cli\n")
    global ROOT
    root, ROOT = ROOT, tmp_path
    try:
        found = imported_modules(f)
    finally:
        ROOT = root
    assert "sidserve.cli" in found and "sidserve.cli.run_job" in found


def test_no_library_module_imports_the_command_line():
    offenders = [str(p.relative_to(ROOT)) for p in modules()
                 if p.name not in ("cli.py", "__main__.py") or p.parent != PKG
                 if any(m == "sidserve.cli" or m.startswith("sidserve.cli.") for m in imported_modules(p))]
    assert not offenders, f"{offenders} import sidserve.cli; use sidserve.runner"


def test_one_list_of_tokenizer_types():
    from sidserve.cli import TOKENIZERS, build_parser
    from sidserve.tokenizers.registry import BUILTIN

    assert TOKENIZERS == list(BUILTIN)
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    choice = next(a for a in train._actions if a.dest == "tokenizer")
    assert list(choice.choices) == list(BUILTIN) and choice.default in BUILTIN


def test_modules_over_the_size_limit_say_why():
    long = {str(p.relative_to(ROOT)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    silent = [f"{name} ({n} lines)" for name, n in long.items()
              if WHY not in "\n".join((ROOT / name).read_text().splitlines()[:6])]
    assert not silent, f"split these or say why in their first lines ({WHY!r}): {silent}"


def cited_paths(doc: str) -> list[str]:
    """Repository-style paths a docstring names (``dir/file.ext``)."""
    return re.findall(r"(?<![\w./<>-])((?:\.\./)*[\w.-]+/[\w./-]*\w\.(?:md|py|yaml|txt|json))\b", doc)


def test_the_citation_scan_finds_paths():
    assert cited_paths("see docs/evaluation.md and ../shared/DESIGN.md, not <root>/x.txt") == [
        "docs/evaluation.md", "../shared/DESIGN.md"]


def test_docstrings_cite_files_inside_the_repository():
    missing = []
    for p in modules():
        tree = ast.parse(p.read_text())
        docs = [ast.get_docstring(n) for n in ast.walk(tree)
                if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
        for doc in filter(None, docs):
            missing += [f"{p.relative_to(ROOT)}: {name}" for name in cited_paths(doc)
                        if not (ROOT / name).resolve().is_relative_to(ROOT) or not (ROOT / name).exists()]
            if "DESIGN.md" in doc:
                missing.append(f"{p.relative_to(ROOT)}: DESIGN.md (not in the repository)")
    assert not missing, missing


def test_adc_sid_config_lives_with_adc_sid():
    from sidserve import TokenizerConfig

    assert TokenizerConfig.__module__ == "sidserve.tokenizers.adc_sid.config"
    assert not (PKG / "config.py").exists()
