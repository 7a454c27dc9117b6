"""API keys without Ray: the Bearer check, where the keys come from (flags, config, environment) and the warning
for an endpoint on every interface with no key. The check through a real Serve app is in test_serve.py."""

import logging

import pytest

from pearl_ray.cli import parse_args, serve_config
from pearl_ray.serve import ServeConfig
from pearl_ray.serve.protocol import ApiError, check_api_key


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "sk-a", "Basic sk-a", "Bearer sk-b",
                                    "Bearer sk-a2", "Bearer sk-", "Bearer SK-A", "Bearer sk-\u00e9"])
def test_a_missing_or_wrong_key_is_a_401_in_openai_shape(header):
    with pytest.raises(ApiError) as info:
        check_api_key(header, ("sk-a", "sk-c"))
    err = info.value
    assert err.status == 401 and err.code == "invalid_api_key"
    assert err.body()["error"]["type"] == "invalid_request_error" and err.headers() == {"WWW-Authenticate": "Bearer"}


@pytest.mark.parametrize("header", ["Bearer sk-a", "bearer sk-c", "  Bearer   sk-a  "])
def test_any_configured_key_passes(header):
    check_api_key(header, ("sk-a", "sk-c"))


def test_no_keys_means_no_check():
    check_api_key(None, ())


def test_keys_come_from_the_config_and_its_environment_variable():
    config = ServeConfig(api_keys=["sk-a"], api_key_env="MY_KEYS")
    assert config.effective_api_keys({"MY_KEYS": " sk-b, ,sk-a,sk-c "}) == ("sk-a", "sk-b", "sk-c")
    assert config.effective_api_keys({}) == ("sk-a",)
    assert ServeConfig(api_key_env=None).effective_api_keys({"PEARL_RAY_API_KEY": "sk-x"}) == ()
    assert ServeConfig().effective_api_keys({"PEARL_RAY_API_KEY": "sk-x"}) == ("sk-x",)
    for bad in ([""], [" sk-a"]):
        with pytest.raises(ValueError, match="API key"):
            ServeConfig(api_keys=bad)
    assert "sk-a" not in repr(config)


def test_serve_flags_and_environment_fill_api_keys(monkeypatch):
    monkeypatch.delenv("PEARL_RAY_API_KEY", raising=False)
    args = parse_args(["serve", "--api-key", "sk-a", "--api-key", "sk-b"])
    assert serve_config(args).api_keys == ["sk-a", "sk-b"]
    monkeypatch.setenv("PEARL_RAY_API_KEY", "sk-env")
    assert serve_config(parse_args(["serve"])).api_keys == ["sk-env"]


def test_every_interface_without_a_key_warns(monkeypatch, caplog):
    """run_blocking warns before it touches Ray; a stub stops it right there."""
    import pearl_ray.runtime.backend as backend
    from pearl_ray.serve import app

    class Stop(Exception):
        pass

    def stop(**_):
        raise Stop

    monkeypatch.setattr(backend, "connect_ray", stop)
    monkeypatch.delenv("PEARL_RAY_API_KEY", raising=False)
    cases = [("0.0.0.0", ServeConfig(), True), ("::", ServeConfig(), True), ("10.1.2.3", ServeConfig(), True),
             ("127.0.0.1", ServeConfig(), False), ("localhost", ServeConfig(), False),
             ("0.0.0.0", ServeConfig(api_keys=["sk-a"]), False)]
    for host, config, warns in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pearl_ray.serve.app"), pytest.raises(Stop):
            app.run_blocking(config, host=host, port=8123)
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert bool(said) == warns, (host, said)
        if warns:
            assert "without an API key" in said[0] and "anyone" in said[0], said
