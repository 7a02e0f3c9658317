"""The request guard's rules: which Host names a server answers. (Served live, refusals and body limits are
tested in tests/test_server.py.)"""
from picochat.guard import allowed_hosts


def test_allowed_hosts():
    assert allowed_hosts("127.0.0.1") == {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts("box.lan", ["proxy.example:443"]) == {"localhost", "127.0.0.1", "::1", "box.lan",
                                                               "proxy.example"}
    assert allowed_hosts("::1") == {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts("fe80::2") == {"localhost", "127.0.0.1", "::1", "fe80::2"}
    # every interface: keyless, only the loopback names and --allowed-host; with a key, any name
    assert allowed_hosts("0.0.0.0", ["[fe80::1]"]) == {"localhost", "127.0.0.1", "::1", "fe80::1"}
    assert allowed_hosts("::") == {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts("0.0.0.0", api_key="k") is None and allowed_hosts("::", api_key="k") is None
    assert allowed_hosts("127.0.0.1", api_key="k") == {"localhost", "127.0.0.1", "::1"}
