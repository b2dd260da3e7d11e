"""The installed names: ``minicpmv_jax`` and its subpackages only, no generic top-level package.

A user's own ``sharding.py`` or another distribution's ``convert_weights`` must not be imported in place
of ours (nor ours in place of theirs): the converter and the sharding rules live in the repository's
top-level folders but install as ``minicpmv_jax.convert_weights`` and ``minicpmv_jax.sharding``.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import textwrap


def test_no_generic_top_level_name_and_every_module_imports_without_one(tmp_path):
    # A decoy `sharding` and `convert_weights` in the working folder: imported by any leftover plain
    # `import sharding`, they would fail loudly.
    for name in ("sharding", "convert_weights"):
        (tmp_path / f"{name}.py").write_text("raise ImportError('the user\\'s own module was imported')\n")
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        import minicpmv_jax
        from minicpmv_jax import convert_weights, sharding
        assert sharding.__name__ == "minicpmv_jax.sharding" and convert_weights.__name__ == "minicpmv_jax.convert_weights"
        names = [m.name for pkg in (minicpmv_jax, sharding, convert_weights)  # the last two live elsewhere
                 for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
        for name in names:
            importlib.import_module(name)
        assert "minicpmv_jax.memory_plan" in names and "minicpmv_jax.convert_weights._convert" in names, names
        leaked = sorted(n for n in sys.modules if n.split(".")[0] in ("sharding", "convert_weights"))
        assert not leaked, leaked
        print(len(names))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) > 40


def test_no_test_file_imports_another_test_file():
    """Shared test helpers live in ``tests/helpers.py`` (or the torch references), never in a ``test_*.py``:
    importing one test file from another runs its module-level code and, under pytest, can collect its
    tests twice. Every import counts, the ones inside functions too."""
    import ast
    import pathlib

    tests = pathlib.Path(__file__).resolve().parent
    offenders = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):  # `from test_x import y`, and `from . import test_x`
                modules = [node.module] if node.module else [alias.name for alias in node.names]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno} imports {m}" for m in modules
                          if m.split(".")[0].startswith("test_")]
    assert len(list(tests.glob("test_*.py"))) > 30
    assert not offenders, "\n".join(offenders)


# ---------------------------------------------------------------------------------------- import graph


def _project_modules() -> dict[str, pathlib.Path]:
    """Every module of the installed package, by dotted name (the mapped subpackages included)."""
    import minicpmv_jax
    from minicpmv_jax import convert_weights, sharding

    out = {}
    for pkg in (minicpmv_jax, sharding, convert_weights):
        root = pathlib.Path(pkg.__path__[0])
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([pkg.__name__, *parts])] = path
    return out


def _imports(module: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The project modules ``module`` imports, at any depth of its code (inside functions too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # an attribute of a module: the module
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def test_the_package_has_no_import_cycle():
    """Layers import only downward: no cycle among the package's modules, counting imports inside functions
    (a lazy import written to dodge a cycle hides an arrow pointing the wrong way). A package ``__init__``
    re-exporting counts too: a module importing a name from the package root depends on all of it."""
    modules = _project_modules()
    assert "minicpmv_jax.model" in modules and "minicpmv_jax.sharding.rules" in modules
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    order, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"
        order.append(node)

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert len(order) == len(modules)


# ---------------------------------------------------------------------------------------- layers

#: The layers of docs/architecture.md, bottom first. A module may import modules of its own layer or of a
#: lower one, never of a higher one. Every module of the package is listed: a new one needs a place.
LAYERS = {
    "leaves": ["errors", "dtypes", "version", "buckets", "checkpoint_files", "lazy_exports"],
    "configuration": ["config", "generation_config"],
    "context": ["sharding", "sharding.context", "sharding.mesh", "sharding.placement", "sharding.rules", "host"],
    "beside the towers": [
        # processing (host side, no JAX)
        "slicing", "image_processing", "video", "tokenizer", "chat_template", "processor", "conversation",
        "position_buckets", "patches", "text_stream",
        # checkpoint files
        "hf_checkpoint", "checkpoint_names", "orbax_checkpoint", "checkpoint_folder", "hub", "demo",
        "testing", "testing.checkpoint", "testing.tokenizer_files",
        # building blocks
        "layers", "attention", "kv_cache", "quantization"],
    "towers": ["vision", "resampler", "qwen2"],
    "model": ["model", "image_inputs"],
    "generation": ["generate", "sampling", "beam_search", "feature_cache", "memory_plan", "compiled_plan"],
    "chat, training, conversion": [
        "chat", "finetune", "finetune.batching", "finetune.checkpoint", "finetune.config", "finetune.data",
        "finetune.device_batch", "finetune.export", "finetune.lora", "finetune.loss", "finetune.optim",
        "finetune.train_state", "finetune.train_step", "finetune.trainer",
        "convert_weights", "convert_weights._convert", "convert_weights._errors", "convert_weights._output",
        "convert_weights._ring", "convert_weights._source", "convert_weights._transpose",
        "engine", "engine.engine", "engine.request", "engine.slots"],
    "server": ["server", "server.app", "server.errors", "server.limits", "server.media", "server.metrics",
               "server.protocol", "server.responses", "server.run"],
    "entry points": ["", "cli", "cli_generate", "cli_finetune", "cli_serve"],
}

#: Host-side modules: numpy, PIL, tokenizers, jinja2, PyAV and safetensors, never JAX.
HOST_ONLY = ["slicing", "image_processing", "video", "tokenizer", "chat_template", "processor", "conversation",
             "position_buckets", "patches", "text_stream", "hub", "hf_checkpoint", "checkpoint_files", "buckets", "errors"]


def _layer_of() -> dict[str, int]:
    out = {}
    for level, names in enumerate(LAYERS.values()):
        for name in names:
            out["minicpmv_jax" + (f".{name}" if name else "")] = level
    return out


def test_every_module_imports_only_its_own_layer_or_lower():
    """docs/architecture.md's one-way rule, imports inside functions and a package ``__init__``'s
    type-checking imports included. Fails naming each arrow that points up."""
    modules = _project_modules()
    layer_of = _layer_of()
    names = list(LAYERS)
    unplaced = sorted(set(modules) - set(layer_of))
    assert not unplaced, f"modules without a layer (add them to LAYERS and docs/architecture.md): {unplaced}"
    assert not sorted(set(layer_of) - set(modules)), "LAYERS names modules that do not exist"
    upward = [f"{m} ({names[layer_of[m]]}) imports {d} ({names[layer_of[d]]})"
              for m, p in sorted(modules.items()) for d in sorted(_imports(m, p, modules))
              if layer_of[d] > layer_of[m]]
    assert not upward, "\n".join(upward)


def test_processing_imports_no_jax(tmp_path):
    """Processing sits beside the towers on the host: importing it (through the package root, which loads
    nothing until a name is used) loads neither JAX nor the model."""
    script = textwrap.dedent(f"""
        import importlib, sys
        for name in {HOST_ONLY!r}:
            importlib.import_module("minicpmv_jax." + name)
        from minicpmv_jax import MiniCPMVProcessor, load_image, load_video
        heavy = sorted(n for n in sys.modules if n.split(".")[0] in ("jax", "flax", "orbax", "torch")
                       or n in ("minicpmv_jax.model", "minicpmv_jax.chat"))
        assert not heavy, heavy
        import minicpmv_jax
        assert minicpmv_jax.MiniCPMV.__module__ == "minicpmv_jax.chat" and "jax" in sys.modules
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
