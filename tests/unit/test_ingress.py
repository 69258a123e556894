"""`raytp serve --ingress` (raytp/ingress.py): the environment the local Ray it starts inherits."""
import os

import pytest

from raytp import cli, ingress


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(ingress.HAPROXY_ENV, raising=False)
    monkeypatch.delenv(ingress.DRAIN_ENV, raising=False)
    for name in ingress.HAPROXY_PORT_ENVS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_haproxy_ingress_sets_serve_env_and_a_short_drain(clean_env):
    clean_env.setattr(ingress, "_haproxy_missing", lambda: None)
    ingress.choose_ingress("haproxy")
    assert os.environ[ingress.HAPROXY_ENV] == "1" and os.environ[ingress.DRAIN_ENV] == "1"
    stats, metrics = (int(os.environ[name]) for name in ingress.HAPROXY_PORT_ENVS)
    assert stats != metrics and 8404 not in (stats, metrics) and 9101 not in (stats, metrics)


def test_a_drain_period_the_user_set_is_kept(clean_env):
    clean_env.setattr(ingress, "_haproxy_missing", lambda: None)
    clean_env.setenv(ingress.DRAIN_ENV, "20")
    ingress.choose_ingress("haproxy")
    assert os.environ[ingress.DRAIN_ENV] == "20"


def test_without_haproxy_it_says_why_and_uses_serves_proxy(clean_env, capsys):
    clean_env.setattr(ingress, "_haproxy_missing", lambda: "no HAProxy binary")
    ingress.choose_ingress("haproxy")
    assert os.environ[ingress.HAPROXY_ENV] == "0"
    assert "no HAProxy binary; HTTP goes through Serve's proxy" in capsys.readouterr().out


def test_proxy_ingress_turns_haproxy_off(clean_env):
    clean_env.setenv(ingress.HAPROXY_ENV, "1")
    ingress.choose_ingress("proxy")
    assert os.environ[ingress.HAPROXY_ENV] == "0"


def test_ingress_option_defaults_to_haproxy():
    args = cli.build_parser().parse_args(["serve", "--model", "tiny"])
    assert args.ingress == "haproxy"
    assert cli.build_parser().parse_args(["serve", "--model", "tiny", "--ingress", "proxy"]).ingress == "proxy"
