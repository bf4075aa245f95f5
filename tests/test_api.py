"""The public API has one shape: what `renorm_convert.__all__` lists is what
is reachable, what the README uses is listed, and the errors are four
kinds."""

import ast
import os
import re

import renorm_convert as rc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "renorm_convert")


def test_every_listed_name_is_reachable_and_listed_once():
    assert len(rc.__all__) == len(set(rc.__all__))
    for name in rc.__all__:
        assert getattr(rc, name) is not None, name
    assert set(rc.__all__) <= set(dir(rc))


def test_every_name_the_readme_uses_is_listed():
    with open(os.path.join(ROOT, "README.md")) as f:
        used = set(re.findall(r"\brc\.([A-Za-z_]\w*)", f.read()))
    assert used, "the README shows the API as rc.NAME"
    assert used <= set(rc.__all__), sorted(used - set(rc.__all__))


def _exception_classes():
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ClassDef) and any(
                        isinstance(base, ast.Name) and (
                            base.id.endswith(("Error", "Exception"))
                            or base.id in found)
                        for base in node.bases):
                    found[node.name] = os.path.relpath(path, ROOT)
    return found


def test_four_kinds_of_error_all_in_one_module():
    assert _exception_classes() == {
        name: os.path.join("renorm_convert", "errors.py")
        for name in ("RenormConvertError", "ExportError", "BackendError",
                     "NonFiniteLoss")}
    assert issubclass(rc.ExportError, rc.RenormConvertError)
    assert issubclass(rc.BackendError, rc.RenormConvertError)
    assert issubclass(rc.RenormConvertError, ValueError)
    assert issubclass(rc.NonFiniteLoss, RuntimeError)
