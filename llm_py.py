"""llm.py under a second import name, ``llm_py``, that no other package takes.

simonw's ``llm`` package (``pip install llm``) takes the import name ``llm``
too, and where both are installed ``import llm`` gives that package. Installed
with pip, this library is also ``llm_py``, wherever it is::

    import llm_py as llm

    reply = llm.chat([{"role": "user", "content": "Hi"}])

The ``llm-py`` command runs through this name, and ``python -m llm_py`` is the
same command. It is the ``llm.py`` installed beside this file: the very module
``import llm`` gives where that name is this library, else that file loaded
under the name ``llm_py``. A copy of ``llm.py`` in a project needs none of this.
"""

import os
import sys
import types


def _load(name):
    # type: (str) -> types.ModuleType
    """The ``llm.py`` beside this file: ``llm`` itself when that is it, else loaded as ``name``."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llm.py")
    try:  # where ``import llm`` would look, without importing it
        found = importlib.util.find_spec("llm")
    except (ImportError, ValueError):  # a module ``llm`` without a spec, say
        found = None
    if found is not None and found.origin and _same(found.origin, path):
        import llm

        return llm
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError("cannot load %s" % path, name=name, path=path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _same(one, other):
    # type: (str, str) -> bool
    return os.path.normcase(os.path.realpath(one)) == os.path.normcase(os.path.realpath(other))


if __name__ == "__main__":  # python -m llm_py
    sys.exit(_load("llm_py")._main())
else:
    sys.modules[__name__] = _load(__name__)
