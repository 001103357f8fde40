"""The package's layers keep their rules: imports point one way, and no unit grows past what a reader holds.

core (settings, types, the engine protocol, conversation, audio, media): no torch, no FastAPI, no other layer.
api (HTTP): no torch, no engine. local and upstream (the engines): no api, and not each other. ui: core only.
`server` alone puts them together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "qwen_omni_server"
LAYERS = ("core", "api", "local", "upstream", "ui")
TORCH = ("torch", "transformers", "accelerate", "bitsandbytes", "qwen_omni_utils", "torchvision")
WEB = ("fastapi", "starlette", "uvicorn")
FORBIDDEN = {
    "core": (*TORCH, *WEB, "gradio", *(f"qwen_omni_server.{layer}" for layer in LAYERS if layer != "core")),
    "api": (*TORCH, "gradio", "qwen_omni_server.local", "qwen_omni_server.upstream", "qwen_omni_server.ui"),
    "local": (*WEB, "gradio", "qwen_omni_server.api", "qwen_omni_server.upstream", "qwen_omni_server.ui"),
    "upstream": (*TORCH, *WEB, "gradio", "qwen_omni_server.api", "qwen_omni_server.local", "qwen_omni_server.ui"),
    "ui": (*TORCH, *WEB, "qwen_omni_server.api", "qwen_omni_server.local", "qwen_omni_server.upstream"),
}
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 200
LONG = "# long:"  # the one-line comment that says why a unit is longer


def modules(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


def imported(path: Path) -> list[str]:
    """Every module `path` imports, at its top or inside a function."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return names


def breaks(name: str, forbidden: tuple[str, ...]) -> bool:
    return any(name == rule or name.startswith(rule + ".") for rule in forbidden)


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_what_it_may(layer):
    found = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in modules(layer)
        for name in imported(path)
        if breaks(name, FORBIDDEN[layer])
    ]
    assert modules(layer) and not found, "\n".join(found)


def test_the_import_rules_catch_a_forbidden_import(tmp_path):
    """The rule above can fail: an api module that imports torch, even inside a function, is found."""
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    import torch.nn\n    from qwen_omni_server.local import engine\n")
    assert [name for name in imported(module) if breaks(name, FORBIDDEN["api"])] == [
        "torch.nn",
        "qwen_omni_server.local",
        "qwen_omni_server.local.engine",
    ]


def oversized(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        size = node.end_lineno - node.lineno + 1
        limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
        if size > limit and not lines[first - 2].strip().startswith(LONG):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} is {size} lines (at most {limit})")
    return found


def test_no_function_or_class_is_too_long_without_saying_why():
    found = [problem for path in sorted(PACKAGE.rglob("*.py")) for problem in oversized(path)]
    found += [problem for path in ROOT.glob("*.py") for problem in oversized(path)]
    assert not found, "\n".join(found)


def test_the_top_level_files_are_entry_points_over_the_package():
    """multimodal_api.py, modeling_low_vram.py and media.py stay, each a few lines over the package."""
    for name in ("multimodal_api.py", "modeling_low_vram.py", "media.py"):
        text = (ROOT / name).read_text()
        assert "qwen_omni_server" in text and len(text.splitlines()) <= 20, name


def test_the_package_builds_with_its_commands_and_configs(tmp_path):
    """`pip install .` installs the package: every layer, the architecture configs, and the two commands."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "source"  # a copy: building writes build/ and egg-info beside the sources
    shutil.copytree(PACKAGE, source / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "requirements_multimodal.txt", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source), "-w", tmp_path],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("qwen_omni_server-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for layer in LAYERS:
        assert f"qwen_omni_server/{layer}/__init__.py" in names
    assert "qwen_omni_server/local/configs/qwen2.5-omni-3b.config.json" in names
    scripts = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "qwen-omni-serve = qwen_omni_server.server:main" in scripts
    assert "qwen-omni-plan = qwen_omni_server.local.plan:main" in scripts
