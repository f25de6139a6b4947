"""core.workspace and core.config: one layout, names checked on the way to a path, strict config loading."""

from __future__ import annotations

import dataclasses

import pytest

from core.config import ConfigError, field, load_config
from core.names import InvalidName
from core.workspace import Layout, ragtune_home


def test_home_precedence_and_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGTUNE_HOME", str(tmp_path / "env"))
    assert ragtune_home() == (tmp_path / "env").resolve()
    assert ragtune_home(tmp_path / "explicit") == (tmp_path / "explicit").resolve()
    lay = Layout.open(tmp_path / "h")
    assert lay.db == lay.home / "ragtune.db"
    assert lay.adapter_dir("corvida-lora") == lay.home / "adapters" / "corvida-lora"
    assert lay.report_dir("run1") == lay.home / "reports" / "run1"
    assert lay.run_dir("r") == lay.home / "runs" / "r"
    assert lay.upload_dir("docs") == lay.home / "uploads" / "docs"
    assert lay.collection_dir(3) == lay.home / "collections" / "3"


@pytest.mark.parametrize("name", ["../x", "../../victim", "./x", "././x", "/etc", "a/b", "..", ".", "", "x" * 65,
                                  "a\x00b", "a\\b", "~root", " x", "x\n"])
def test_every_user_named_folder_refuses_what_is_not_a_plain_name(tmp_path, name):
    lay = Layout.open(tmp_path)
    for method in (lay.adapter_dir, lay.report_dir, lay.run_dir, lay.upload_dir):
        with pytest.raises(InvalidName):
            method(name)


def test_a_symlink_planted_in_the_adapters_folder_is_refused(tmp_path):
    lay = Layout.open(tmp_path / "h")
    lay.adapters.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (lay.adapters / "planted").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InvalidName, match="resolves outside"):
        lay.adapter_dir("planted")


@dataclasses.dataclass
class Demo:
    rate: float = field(0.5, help="a rate")
    n: int = field(3, help="a count")


@pytest.mark.parametrize("content, match", [
    (b"rate: .nan\n", "finite"),
    (b"rate: .inf\n", "finite"),
    (b"bogus: 1\n", "unknown key"),
    (b"1: 2\n", "keys must be names"),
    (b"- a\n- b\n", "mapping"),
    (b"rate: [\n", "not valid YAML"),
    (b"rate: \xff\xfe\n", "UTF-8"),
    (b"!!python/object:os.system {}\n", "not valid YAML"),
    (b"n: 1.5\n", "integer"),
])
def test_bad_config_files_get_one_line_errors(tmp_path, content, match):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        load_config(Demo, path)


def test_a_folder_or_missing_file_as_config(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(Demo, tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Demo, tmp_path / "none.yaml")
    assert load_config(Demo, None, ["rate=0.25"]).rate == 0.25


def test_write_atomic_replaces_whole_files_and_a_failure_keeps_the_old(tmp_path, monkeypatch):
    import os

    from core.files import write_atomic

    target = tmp_path / "run.json"
    write_atomic(target, "first")
    write_atomic(target, b"second", fsync=True)
    assert target.read_text() == "second"

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        write_atomic(target, "third")
    assert target.read_text() == "second" and sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]
