"""The house: rmtrain's modules import each other one way (no circle, counting imports inside functions), and
rewards are computed without gradients in one loop (rmtrain.inference), not in a second one elsewhere."""

import ast
import re

from tests.conftest import ROOT

PACKAGE = ROOT / "rmtrain"


def imports() -> dict[str, set[str]]:
    """Each module's rmtrain imports, wherever in the module they are."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "rmtrain":
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rmtrain."):
                found.add(node.module.split(".")[1])
        graph[path.stem] = found - {path.stem}
    return graph


def test_no_module_imports_back_up():
    graph = imports()
    assert graph["batching"] <= {"attention", "flops", "groups"}  # it collates; it runs no model
    assert "layout" not in graph["model"] | graph["attention"] | graph["batching"]  # the layout module sits above them
    order: list[str] = []
    visiting: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in visiting, f"an import circle: {' -> '.join(path + (module,))}"
        if module in order:
            return
        visiting.add(module)
        for dependency in sorted(graph.get(module, ())):
            visit(dependency, path + (module,))
        visiting.discard(module)
        order.append(module)

    for module in sorted(graph):
        visit(module, ())


def test_one_scoring_loop():
    """No second no-grad forward loop: only inference.py scores; the probe (layout), training's chunk rewards (train)
    and plain transformers' own check (plain_check) run the model without gradients otherwise."""
    allowed = {"inference", "layout", "train", "plain_check", "export"}  # export: editing the head's weights
    using = {p.stem for p in PACKAGE.glob("*.py") if re.search(r"torch\.(no_grad|inference_mode)\(", p.read_text())}
    assert "inference" in using and using <= allowed, using - allowed
