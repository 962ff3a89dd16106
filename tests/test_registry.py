import pytest

from mentor.registry import Registry, RegistryError, did_you_mean


def test_register_get_list_and_describe():
    r = Registry("widget")

    @r.register("beta")
    def beta():
        """Second widget.

        More text."""

    r.register("alpha", 1, description="first")
    assert r.names() == ["alpha", "beta"]
    assert r.get("beta") is beta
    assert r.describe("beta") == "Second widget."
    assert r.describe("alpha") == "first"
    assert "alpha" in r and len(r) == 2 and list(r) == ["alpha", "beta"]


def test_unknown_name_suggests_and_lists():
    r = Registry("widget")
    r.register("temperature", 1)
    r.register("other", 2)
    with pytest.raises(RegistryError) as e:
        r.get("temprature")
    msg = str(e.value)
    assert "unknown widget 'temprature'" in msg
    assert "Did you mean 'temperature'?" in msg
    assert "Valid names: other, temperature" in msg


def test_duplicate_registration_fails():
    r = Registry("widget")
    r.register("a", 1)
    with pytest.raises(RegistryError, match="already registered"):
        r.register("a", 2)


def test_did_you_mean_empty_when_nothing_close():
    assert did_you_mean("zzzz", ["alpha", "beta"]) == ""
