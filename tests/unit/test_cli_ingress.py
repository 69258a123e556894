"""`raytp serve --ingress`: the environment the local Ray it starts inherits."""
import os

import pytest

from raytp import cli


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(cli.HAPROXY_ENV, raising=False)
    monkeypatch.delenv(cli.DRAIN_ENV, raising=False)
    for name in cli.HAPROXY_PORT_ENVS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_haproxy_ingress_sets_serve_env_and_a_short_drain(clean_env):
    clean_env.setattr(cli, "_haproxy_missing", lambda: None)
    cli._choose_ingress("haproxy")
    assert os.environ[cli.HAPROXY_ENV] == "1" and os.environ[cli.DRAIN_ENV] == "1"
    stats, metrics = (int(os.environ[name]) for name in cli.HAPROXY_PORT_ENVS)
    assert stats != metrics and 8404 not in (stats, metrics) and 9101 not in (stats, metrics)


def test_a_drain_period_the_user_set_is_kept(clean_env):
    clean_env.setattr(cli, "_haproxy_missing", lambda: None)
    clean_env.setenv(cli.DRAIN_ENV, "20")
    cli._choose_ingress("haproxy")
    assert os.environ[cli.DRAIN_ENV] == "20"


def test_without_haproxy_it_says_why_and_uses_serves_proxy(clean_env, capsys):
    clean_env.setattr(cli, "_haproxy_missing", lambda: "no HAProxy binary")
    cli._choose_ingress("haproxy")
    assert os.environ[cli.HAPROXY_ENV] == "0"
    assert "no HAProxy binary; HTTP goes through Serve's proxy" in capsys.readouterr().out


def test_proxy_ingress_turns_haproxy_off(clean_env):
    clean_env.setenv(cli.HAPROXY_ENV, "1")
    cli._choose_ingress("proxy")
    assert os.environ[cli.HAPROXY_ENV] == "0"


def test_ingress_option_defaults_to_haproxy():
    args = cli.build_parser().parse_args(["serve", "--model", "tiny"])
    assert args.ingress == "haproxy"
    assert cli.build_parser().parse_args(["serve", "--model", "tiny", "--ingress", "proxy"]).ingress == "proxy"
