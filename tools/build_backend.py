"""The build backend: flit_core's, with ``llm_py.py`` added to the wheel.

flit_core ships one top-level module, ``llm.py``. The wheel also needs
``llm_py.py``, the import name that simonw's ``llm`` package cannot shadow
(see the README, "Next to simonw's llm"), which the ``llm-py`` command runs
through. This adds it to the wheel flit_core built, with its line in RECORD;
everything else (metadata, sdist, editable installs) is flit_core's own. An
editable install finds ``llm_py.py`` in the checkout, as it finds ``llm.py``.
"""

import base64
import hashlib
import os
import zipfile
from typing import Any, Dict, Optional

from flit_core import buildapi  # type: ignore  # it has no type hints

# flit_core's own hooks, but for build_wheel
get_requires_for_build_wheel = buildapi.get_requires_for_build_wheel
get_requires_for_build_sdist = buildapi.get_requires_for_build_sdist
get_requires_for_build_editable = buildapi.get_requires_for_build_editable
prepare_metadata_for_build_wheel = buildapi.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = buildapi.prepare_metadata_for_build_editable
build_editable = buildapi.build_editable
build_sdist = buildapi.build_sdist

EXTRA = "llm_py.py"  # in the source tree (PEP 517: the working directory) and the wheel's root


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    # type: (str, Optional[Dict[str, Any]], Optional[str]) -> str
    name = str(buildapi.build_wheel(wheel_directory, config_settings, metadata_directory))
    with open(EXTRA, "rb") as f:
        _add(os.path.join(wheel_directory, name), EXTRA, f.read())
    return name


def _add(wheel, name, data):
    # type: (str, str, bytes) -> None
    """Rewrite the zip ``wheel`` with ``name`` after its first module and in its RECORD."""
    with zipfile.ZipFile(wheel) as old:
        entries = [(info, old.read(info)) for info in old.infolist()]
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    record_line = b"%s,sha256=%s,%d\n" % (name.encode(), digest, len(data))
    first = entries[0][0]
    added = zipfile.ZipInfo(name, first.date_time)  # flit_core's reproducible timestamp
    added.external_attr = first.external_attr
    added.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(wheel + ".tmp", "w", zipfile.ZIP_DEFLATED) as new:
        for number, (info, content) in enumerate(entries):
            if info.filename.endswith(".dist-info/RECORD"):
                content = record_line + content
            new.writestr(info, content)
            if number == 0:
                new.writestr(added, data)
    os.replace(wheel + ".tmp", wheel)
