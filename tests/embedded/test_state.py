"""State files of the embedded stack: private, and replaced whole."""

import stat

from tessera.embedded.state import read_env_file, update_env_file, write_private


def test_write_private_replaces_the_file_whole_and_keeps_it_private(tmp_path):
    path = tmp_path / "state" / "credentials.json"
    write_private(path, "first")
    inode = path.stat().st_ino
    write_private(path, "second, longer than the first")
    assert path.read_text() == "second, longer than the first"
    assert path.stat().st_ino != inode  # a new file renamed over the old one, not the old one truncated
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["credentials.json"]  # no temporary left behind


def test_env_file_round_trip(tmp_path):
    update_env_file({"A": "1", "B": "two words"}, tmp_path)
    update_env_file({"B": "it's"}, tmp_path)
    assert read_env_file(tmp_path) == {"A": "1", "B": "it's"}
