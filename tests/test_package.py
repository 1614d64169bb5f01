"""The package installs under its own names: mmebm_dist.kernels is this repository's kernels/ folder."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_kernels_package_is_this_repositorys_folder():
    import mmebm_dist.kernels as k

    assert Path(k.__file__).resolve().parent == REPO / "kernels"


def test_cli_lists_every_command(capsys):
    import pytest

    from mmebm_dist.cli import COMMANDS, main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_pyproject_lists_every_package():
    """The packages are listed explicitly (kernels/ is remapped), so a new folder must be added there too or a
    non-editable install silently lacks it."""
    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "mmebm_dist").rglob("__init__.py")}
    found.add("mmebm_dist.kernels")
    assert listed == found
