"""The build: pyproject.toml says what pciguard is; this file adds the verifier's hot
modules compiled to C by mypyc, when this machine can (a C compiler and Python's
headers). Compiling is optional: without it the same modules run as Python.

The compiled modules go to ``pciguard/verify/_compiled/`` with a stamp of the sources
they were built from; ``pciguard.verify`` takes them only while the sources still match
(an edited checkout runs its Python, not a stale build), and never under
``PCIGUARD_COMPILED=0``. No toolstack or platform module is compiled: the verifier runs
the product's toolstack as a host does.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# Read as a file, not imported as pciguard.verify: the package is not installed yet.
_spec = importlib.util.spec_from_file_location("compiled", ROOT / "src/pciguard/verify/compiled.py")
assert _spec is not None and _spec.loader is not None
compiled = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compiled)
COMPILED, OUTPUT, STAMP = compiled.COMPILED, compiled.OUTPUT, compiled.STAMP


class BuildCompiledVerifier(build_ext):
    """Puts each compiled module under ``_compiled/`` (beside the package's sources, not
    among them: Python would prefer a module there to its source), then the stamp, only
    once every module built (the extensions are optional: one that fails is left out).
    An editable install copies them to the same places in the source tree."""

    def get_ext_fullpath(self, ext_name: str) -> str:
        path = Path(super().get_ext_fullpath(ext_name))
        if ext_name not in COMPILED:
            return str(path)  # mypyc's shared runtime, at the top: kept there
        return str(path.parent / OUTPUT.name / path.name)

    def run(self) -> None:
        self._built: list[Path] = []
        super().run()

    def build_extension(self, ext: Extension) -> None:
        super().build_extension(ext)  # raises when it fails
        self._built.append(Path(self.get_ext_fullpath(ext.name)))

    def build_extensions(self) -> None:
        stamp = self._built_dir() / STAMP
        stamp.unlink(missing_ok=True)
        super().build_extensions()
        if len(self._built) == len(self.extensions):
            stamp.write_text(compiled.sources_stamp(ROOT / "src"))

    def copy_extensions_to_source(self) -> None:
        # setuptools' own copy keeps only each file's name, which would drop _compiled/.
        source_root = self._source_root()
        (source_root / OUTPUT / STAMP).unlink(missing_ok=True)
        stamp = self._built_dir() / STAMP
        for path in [*self._built, stamp]:  # the stamp last: it vouches for the rest
            if path.exists():
                target = source_root / path.relative_to(self.build_lib)
                self.mkpath(str(target.parent))
                self.copy_file(str(path), str(target))

    def _built_dir(self) -> Path:
        return Path(self.build_lib, OUTPUT)

    def _source_root(self) -> Path:
        return Path(self.get_finalized_command("build_py").get_package_dir(""))


BUILDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def compiled_extensions() -> list[object]:
    if os.environ.get("PCIGUARD_COMPILE") == "0":  # run.sh audit: the audit needs no verifier
        return []
    if not BUILDS & set(sys.argv[1:]):
        return []  # metadata alone (pip asks for it first): nothing to compile
    if "editable_wheel" in sys.argv and compiled.why_not_compiled(ROOT / "src" / OUTPUT.parent) is None:
        return []  # this checkout's compiled modules are current
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    try:
        extensions = mypycify(
            [
                "--config-file=",  # type-check only what compiling needs; mypy runs in CI
                "--ignore-missing-imports",
                "--follow-imports=silent",
                *(str(Path("src", *module.split("."))) + ".py" for module in COMPILED),
            ],
            opt_level="3",
            group_name="pciguard_verify",
        )
    except (Exception, SystemExit) as exc:  # no compiler, no headers, a module mypyc refuses
        # (it exits on a type error): the install goes on, and the verifier runs as Python
        print(f"pciguard: the verifier runs as Python ({exc!r})", file=sys.stderr)
        return []
    for extension in extensions:
        extension.optional = True
    return list(extensions)


if __name__ == "__main__":  # as the build runs it (tests import it to try the fallback)
    setup(ext_modules=compiled_extensions(), cmdclass={"build_ext": BuildCompiledVerifier})
