"""API keys: where they come from, how they are checked, and the per-key limit."""

from __future__ import annotations

import pytest

from frontend.keys import KEY_ENV, Keys, OverLimit, Unauthorized, fingerprint, load_keys


def test_keys_come_from_flags_environment_and_file_in_order(tmp_path):
    file = tmp_path / "keys.txt"
    file.write_text("# operators\nfile-key-0001\n\nflag-key-0001  # again\n")
    keys = load_keys(["flag-key-0001"], file, env={KEY_ENV: "env-key-0001, env-key-0002"})
    assert keys == ["flag-key-0001", "env-key-0001", "env-key-0002", "file-key-0001"]
    assert load_keys(None, None, env={}) == []
    with pytest.raises(ValueError, match="does not exist"):
        load_keys(None, tmp_path / "missing", env={})
    with pytest.raises(ValueError, match="at least 8 printable") as e:
        load_keys(["short"], None, env={})
    assert "short" not in str(e.value) and fingerprint("short") in str(e.value)


def test_a_bearer_key_is_checked():
    keys = Keys(["secret-key-1", "secret-key-2"], 4)
    assert keys.check("Bearer secret-key-2") == "secret-key-2"
    assert keys.check("bearer  secret-key-1") == "secret-key-1"
    for header in (None, "", "secret-key-1", "Basic secret-key-1", "Bearer ", "Bearer secret-key-3"):
        with pytest.raises(Unauthorized):
            keys.check(header)
    assert Keys([], 4).check(None) == ""  # without keys, every caller is let in


def test_each_key_has_its_own_limit_and_slots_come_back():
    keys = Keys(["secret-key-1", "secret-key-2"], 3)
    keys.acquire("secret-key-1", 2)
    with pytest.raises(OverLimit, match="the limit is 3"):
        keys.acquire("secret-key-1", 2)
    keys.acquire("secret-key-2", 3)  # another key's slots are its own
    keys.acquire("secret-key-1")
    keys.release("secret-key-1", 3)
    assert keys.in_flight("secret-key-1") == 0 and keys.in_flight("secret-key-2") == 3
    with pytest.raises(ValueError):
        Keys([], 0)
