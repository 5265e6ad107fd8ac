"""moekit.interop.safety: paths that stay inside a folder, and what a checkpoint write may replace."""

from __future__ import annotations

import pytest

from moekit.errors import CheckpointError, MoekitError
from moekit.files import record_owned
from moekit.interop.safety import member, plan_write


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd", "a/../../b", "", "a\\b", 3, None])
def test_member_refuses_names_leaving_the_folder(tmp_path, name):
    with pytest.raises(CheckpointError):
        member(tmp_path, name, "index")


def test_member_follows_links_inside_only(tmp_path):
    (tmp_path / "real.safetensors").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.safetensors").symlink_to("real.safetensors")
    assert member(tmp_path, "link.safetensors", "index") == tmp_path / "link.safetensors"
    assert member(tmp_path, "sub/y", "index") == tmp_path / "sub" / "y"
    (tmp_path / "out.safetensors").symlink_to("/etc/hostname")
    with pytest.raises(CheckpointError, match="outside"):
        member(tmp_path, "out.safetensors", "index")


def test_plan_write(tmp_path):
    assert plan_write(tmp_path / "new", overwrite=False) == []
    d = tmp_path / "d"
    d.mkdir()
    for name in ("config.json", "model.safetensors", "README.md"):
        (d / name).write_text("theirs")
    with pytest.raises(MoekitError, match=r"holds a model moekit did not write \(config.json, model.safetensors\)"):
        plan_write(d, overwrite=False)
    assert plan_write(d, overwrite=True) == ["README.md"]
    record_owned(d, "pretrained", ["config.json", "model.safetensors"])  # now moekit's, beside the user's README
    assert plan_write(d, overwrite=False) == ["README.md"]
    (d / "model-00001-of-00002.safetensors").write_text("theirs")
    with pytest.raises(MoekitError, match="model-00001-of-00002"):
        plan_write(d, overwrite=False)
    record_owned(d, "run", ["config.json"], replace=True)
    with pytest.raises(MoekitError, match="is a moekit run folder"):
        plan_write(d, overwrite=True)
