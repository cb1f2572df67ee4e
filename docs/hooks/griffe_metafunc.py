"""Griffe extension used only by the documentation build (mkdocs.yml); not part of the package.

Two adjustments, both made on griffe's static model of the source (nothing is imported):

1. A package that re-exports a function from a submodule of the same name (``from .maml import maml`` in
   ``metafunc/algorithms/__init__.py``) binds the *function* at run time, but griffe lets the submodule shadow it,
   so ``::: metafunc.maml`` would render the whole module. Every top-level alias of ``metafunc`` that lands on a
   module holding a non-module member of its own name is pointed at that member, as Python does.
2. The docstrings use Google style with singular ``Example:`` headings, which griffe only knows as ``Examples:``
   (otherwise the doctest lines are rendered as Markdown block quotes). ``Example:`` headings become ``Examples:``,
   and Sphinx roles (``:func:`anil` ``) become plain code spans.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:(\s*)$", re.MULTILINE)
_SPHINX_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const):`~?([^`]+)`")


class MetafuncDocs(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "metafunc":
            return
        for name, member in list(pkg.members.items()):
            if not member.is_alias:
                continue
            try:
                target = member.final_target
                shadowed = target.members.get(name) if target.is_module else None
                if shadowed is not None and not shadowed.is_module:
                    member.target = shadowed
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                continue
        self._fix_examples(pkg, seen=set())

    def _fix_examples(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            value = _EXAMPLE_HEADING.sub(r"\1Examples:\2", obj.docstring.value)
            obj.docstring.value = _SPHINX_ROLE.sub(r"`\1`", value)
        for member in obj.members.values():
            if not member.is_alias:
                self._fix_examples(member, seen)
