"""The run directory's command log: commands written and read back without machine paths."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mmebm_dist.rundir import append_command, portable_argv, portable_command, read_commands

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = sorted(REPO.glob("docs/results*.json")) + sorted(REPO.glob("docs/results*.md")) + [
    REPO / "docs/incomplete.json", REPO / "docs/incomplete.md"]


def test_portable_argv_names_the_program_and_relativises_paths_under_the_root(tmp_path):
    root = tmp_path / "repo"
    argv = [str(root / ".venv/bin/mmebm"), "train", "--config", str(root / "configs/tiny.yaml"),
            f"train.out_dir={root}/runs/a", "data.path=/elsewhere/data", "--resume", "runs/b"]
    assert portable_argv(argv, root=root) == [
        "mmebm", "train", "--config", "configs/tiny.yaml", "train.out_dir=runs/a",
        "data.path=/elsewhere/data", "--resume", "runs/b"]
    module = [str(root / "mmebm_dist/train/__main__.py"), "--config", "c.yaml"]
    assert portable_argv(module, root=root) == ["python", "-m", "mmebm_dist.train", "--config", "c.yaml"]
    assert portable_argv([str(root / "launch/x.py"), str(root)], root=root) == ["launch/x.py", "."]


@pytest.mark.parametrize(("logged", "portable"), [
    ("/work/main/.venv/bin/mmebm train --config configs/a.yaml", "mmebm train --config configs/a.yaml"),
    (".venv/bin/mmebm train --resume runs/x", "mmebm train --resume runs/x"),
    ("/home/me/r/.venv/bin/python3.11 -m mmebm_dist.train", "python -m mmebm_dist.train"),
    ("mmebm eval --run runs/my.venv/bin/mmebm_x", "mmebm eval --run runs/my.venv/bin/mmebm_x"),
])
def test_portable_command_rewrites_only_a_venv_program(logged, portable):
    assert portable_command(logged) == portable


def test_commands_log_round_trip_is_portable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [str(tmp_path / ".venv/bin/mmebm"), "train", f"train.out_dir={tmp_path}/r"]
    monkeypatch.setattr(sys, "argv", argv)
    append_command(tmp_path, world_size=2)
    (tmp_path / "commands.log").write_text((tmp_path / "commands.log").read_text()
                                           + "2026-01-01T00:00:00Z\tworld_size=1\t/x/.venv/bin/mmebm eval\n")
    first, second = read_commands(tmp_path / "commands.log")
    assert first["argv"] == "mmebm train train.out_dir=r" and first["world_size"] == "2"
    assert second["argv"] == "mmebm eval"  # a line logged before the fix reads portable too


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: p.name)
def test_published_documents_show_no_venv_paths(path):
    text = path.read_text()
    assert portable_command(text) == text, f"{path} names a program by its venv path; see portable_command"
