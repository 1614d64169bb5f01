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
