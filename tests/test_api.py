"""The top-level Python API: every advertised name resolves, and importing the package stays light."""
import json
import pkgutil
import subprocess
import sys

import pytest

import lit_sahs


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    return r.stdout


@pytest.mark.parametrize("name", lit_sahs.__all__)
def test_every_public_name_resolves_to_its_module_attribute(name):
    """A name whose definition moved fails here, naming the stale entry of lit_sahs.API."""
    module, attr = lit_sahs.API[name]
    value = getattr(lit_sahs, name)
    assert value is getattr(sys.modules[module], attr)
    assert name in dir(lit_sahs)


def test_all_is_the_api_table_and_from_import_works():
    assert sorted(lit_sahs.__all__) == sorted(lit_sahs.API)
    from lit_sahs import Engine, HeadSet, load_target  # noqa: F401 - the import is the test

    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        lit_sahs.nosuch  # noqa: B018


def test_no_public_name_is_a_submodule_name():
    """Importing lit_sahs.<sub> binds <sub> on the package, so a public name equal to a submodule's
    would mean the module or the function depending on import order."""
    subs = {m.name.rsplit(".", 1)[-1] for m in pkgutil.iter_modules(lit_sahs.__path__)}
    assert not subs & set(lit_sahs.__all__)


def test_import_lit_sahs_loads_no_heavy_library():
    """`python -m lit_sahs --help` and `import lit_sahs` must not pay for torch or Lightning."""
    out = _run("import sys, json, lit_sahs; dir(lit_sahs); lit_sahs.__version__; "
               "print(json.dumps([m for m in ('torch', 'lightning', 'transformers', 'mlflow', 'optuna') "
               "if m in sys.modules]))")
    assert json.loads(out) == []


def test_first_use_of_a_name_imports_its_module():
    out = _run("import sys, lit_sahs; from lit_sahs import HeadSet; "
               "print(HeadSet.__module__, 'lit_sahs.heads' in sys.modules)")
    assert out.split() == ["lit_sahs.heads", "True"]
