"""``specdec.prefix_cache``, ``specdec.quant``, ``specdec.integrations`` and ``specdec.benchmarks``
in a source checkout.

An installed wheel holds these four packages inside ``specdec`` (pyproject.toml maps the
repository's top-level folders there), so it puts no generic top-level names into
site-packages. A checkout, and an editable install of one, keeps the folders at the
repository root, where the tests and ``python -m benchmarks.run`` import them by their folder
names. :func:`install` adds an import finder that makes ``specdec.quant.kv`` the very module
object ``quant.kv`` there: one module under both names (one ``QTensor`` class, one set of
globals to monkeypatch), never two copies of the same file. In a wheel it does nothing.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

SUBPACKAGES = ("prefix_cache", "quant", "integrations", "benchmarks")
ROOT = Path(__file__).resolve().parent.parent  # the checkout, when specdec/ is one of its folders


class _Alias(importlib.abc.Loader):
    """Loads ``specdec.<sub>...`` as the module ``<sub>...`` of the checkout."""

    def __init__(self, folder_name: str):
        self.folder_name = folder_name
        self.spec = None

    def create_module(self, spec):
        module = _import_from_checkout(self.folder_name)
        self.spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self.spec  # the import system set the alias's spec: keep the module's own


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        parts = fullname.split(".")
        if len(parts) < 2 or parts[0] != "specdec" or parts[1] not in SUBPACKAGES:
            return None
        where = ROOT.joinpath(*parts[1:])
        package = (where / "__init__.py").is_file()
        if not package and not where.with_suffix(".py").is_file():
            return None  # not in the checkout: the usual machinery reports it (or finds a data folder)
        return importlib.machinery.ModuleSpec(fullname, _Alias(".".join(parts[1:])), is_package=package)


def _import_from_checkout(name: str):
    """The checkout's module ``name`` (e.g. ``quant.kv``), imported under that name."""
    top = name.split(".")[0]
    module = sys.modules.get(top)
    if module is None:  # import the checkout's folder, whatever else sys.path holds
        spec = importlib.machinery.PathFinder.find_spec(top, [str(ROOT)])
        if spec is None:
            raise ModuleNotFoundError(f"no {top}/ in {ROOT}", name=f"specdec.{name}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[top] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(top, None)
            raise
    if Path(module.__file__).resolve().parent != ROOT / top:
        raise ImportError(f"specdec.{top} is {ROOT / top} in this checkout, but {top!r} is already "
                          f"imported from {module.__file__}", name=f"specdec.{name}")
    return importlib.import_module(name)


def install() -> None:
    """Add the finder, in a checkout only (``specdec/`` without its ``quant/`` beside a ``quant/``)."""
    here = Path(__file__).resolve().parent
    if (here / "quant").is_dir() or not (ROOT / "quant" / "__init__.py").is_file():
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
