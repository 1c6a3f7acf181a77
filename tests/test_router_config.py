"""Router configuration (router/config.py): validation, TOML loading, CLI overrides."""

from __future__ import annotations

import textwrap

import pytest

from router.config import (
    ConfigError,
    DnsConfig,
    InstanceConfig,
    ModelRouting,
    RouterConfig,
    load_config,
    parse_address,
)
from router.policies import create_policy

FULL_TOML = """
grpc_port = 9101
metrics_port = 9102
default_policy = "least_connections"
default_policy_options = { sample_size = 2 }
max_concurrency_per_instance = 4
instances = [
  "10.0.0.1:8001",
  { address = "10.0.0.2:8001", metrics = "10.0.0.2:8002" },
]

[dns]
name = "triton.default.svc.cluster.local"
grpc_port = 7001
metrics_port = 7002
interval_s = 5

[models.llm]
policy = "prefix"
options = { cache_threshold = 0.25 }
"""


def write_toml(tmp_path, text: str):
    path = tmp_path / "router.toml"
    path.write_text(textwrap.dedent(text))
    return path


# -- RouterConfig validation ---------------------------------------------------------------

def test_defaults_are_valid():
    config = RouterConfig()
    assert config.grpc_port == 8001 and config.default_policy == "hybrid"
    assert config.instances == () and config.dns is None


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("field,value", [
    ("grpc_port", 65536), ("grpc_port", -1), ("metrics_port", 70000), ("metrics_port", -5),
])
def test_bad_port_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"{field} must be a TCP port"):
        RouterConfig(**{field: value})


def test_port_zero_means_any_free_port():
    assert RouterConfig(grpc_port=0, metrics_port=0).grpc_port == 0


@pytest.mark.parametrize("field", ["max_concurrency_per_instance", "eject_after_failures"])
@pytest.mark.parametrize("value", [0, -3])
def test_counts_below_one_are_rejected(field, value):
    with pytest.raises(ConfigError, match=f"{field} must be at least 1"):
        RouterConfig(**{field: value})


def test_negative_queue_length_is_rejected_but_zero_is_allowed():
    with pytest.raises(ConfigError, match="max_queue_length"):
        RouterConfig(max_queue_length=-1)
    assert RouterConfig(max_queue_length=0).max_queue_length == 0


@pytest.mark.parametrize("field", ["max_queue_wait_s", "health_interval_s", "health_timeout_s",
                                   "load_poll_interval_s", "drain_timeout_s"])
@pytest.mark.parametrize("value", [0, -1.5])
def test_non_positive_intervals_are_rejected(field, value):
    with pytest.raises(ConfigError, match=f"{field} must be positive"):
        RouterConfig(**{field: value})


@pytest.mark.parametrize("instance,where", [
    (InstanceConfig("no-port"), "instances.address"),
    (InstanceConfig("host:99999"), "instances.address"),
    (InstanceConfig("host:8001", metrics="host:metrics"), "instances.metrics"),
])
def test_bad_instance_address_names_the_field(instance, where):
    with pytest.raises(ConfigError, match=where):
        RouterConfig(instances=(instance,))


def test_unknown_default_policy_names_the_field():
    with pytest.raises(ConfigError, match="default_policy: unknown routing policy 'nope'"):
        RouterConfig(default_policy="nope")


def test_unknown_default_policy_option_names_the_field_and_option():
    with pytest.raises(ConfigError, match="default_policy: .*unknown option 'bogus'"):
        RouterConfig(default_policy_options={"bogus": 1})


def test_bad_per_model_policy_names_the_model():
    with pytest.raises(ConfigError, match="models.llm: unknown routing policy"):
        RouterConfig(models={"llm": ModelRouting("nope")})
    with pytest.raises(ConfigError, match="models.llm: .*unknown option 'nope'"):
        RouterConfig(models={"llm": ModelRouting("prefix", {"nope": 1})})
    with pytest.raises(ConfigError, match="models.llm: .*cache_threshold"):
        RouterConfig(models={"llm": ModelRouting("prefix", {"cache_threshold": 2.0})})


def test_routing_for_falls_back_to_the_default_policy():
    config = RouterConfig(default_policy="round_robin",
                          models={"llm": ModelRouting("prefix", {"cache_threshold": 0.3})})
    assert config.routing_for("llm") == ModelRouting("prefix", {"cache_threshold": 0.3})
    assert config.routing_for("other") == ModelRouting("round_robin", {})


# -- parse_address ---------------------------------------------------------------------------

@pytest.mark.parametrize("address,expected", [
    ("127.0.0.1:9001", ("127.0.0.1", 9001)),
    ("triton.svc:8001", ("triton.svc", 8001)),
    ("[::1]:8001", ("::1", 8001)),
    ("h:65535", ("h", 65535)),
])
def test_parse_address(address, expected):
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["host", ":8001", "host:", "host:http", "host:0",
                                     "host:65536", "host:-1"])
def test_parse_address_rejects_and_names_where(address):
    with pytest.raises(ConfigError, match=r"--instance: expected host:port"):
        parse_address(address, "--instance")


# -- load_config -----------------------------------------------------------------------------

def test_load_config_without_a_file_gives_defaults():
    assert load_config() == RouterConfig()


def test_load_config_reads_every_section(tmp_path):
    config = load_config(write_toml(tmp_path, FULL_TOML))
    assert (config.grpc_port, config.metrics_port) == (9101, 9102)
    assert config.max_concurrency_per_instance == 4
    assert config.instances == (InstanceConfig("10.0.0.1:8001"),
                                InstanceConfig("10.0.0.2:8001", "10.0.0.2:8002"))
    assert config.dns == DnsConfig("triton.default.svc.cluster.local", 7001, 7002, 5)
    assert config.routing_for("llm") == ModelRouting("prefix", {"cache_threshold": 0.25})
    assert config.routing_for("other") == ModelRouting("least_connections", {"sample_size": 2})


def test_instances_as_array_of_tables(tmp_path):
    path = write_toml(tmp_path, """
        [[instances]]
        address = "a:1"
        metrics = "a:2"

        [[instances]]
        address = "b:1"
    """)
    assert load_config(path).instances == (InstanceConfig("a:1", "a:2"), InstanceConfig("b:1"))


def test_cli_overrides_win_and_none_keeps_the_file_value(tmp_path):
    config = load_config(write_toml(tmp_path, FULL_TOML), grpc_port=9999,
                         default_policy=None, max_queue_wait_s=2.5, dns=None)
    assert config.grpc_port == 9999
    assert config.max_queue_wait_s == 2.5
    assert config.default_policy == "least_connections"
    assert config.dns is not None  # None means "flag not given"


def test_instances_from_overrides_are_appended(tmp_path):
    config = load_config(write_toml(tmp_path, FULL_TOML),
                         instances=(InstanceConfig("10.0.0.3:8001"),))
    assert [i.address for i in config.instances] == ["10.0.0.1:8001", "10.0.0.2:8001",
                                                     "10.0.0.3:8001"]
    assert load_config(instances=()).instances == ()


def test_invalid_override_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="grpc_port"):
        load_config(write_toml(tmp_path, FULL_TOML), grpc_port=70000)


def test_unknown_top_level_key_lists_the_known_ones(tmp_path):
    path = write_toml(tmp_path, 'grpc_prot = 1\npolicy = "x"\n')
    with pytest.raises(ConfigError, match=r"unknown router setting\(s\) \['grpc_prot', "
                                          r"'policy'\]; known: .*'grpc_port'"):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the router config"):
        load_config(tmp_path / "absent.toml")


def test_invalid_toml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the router config"):
        load_config(write_toml(tmp_path, "grpc_port = = 1\n"))


def test_unknown_default_policy_in_file_lists_known_policies(tmp_path):
    with pytest.raises(ConfigError, match=r"default_policy: unknown policy 'fast'; known: "):
        load_config(write_toml(tmp_path, 'default_policy = "fast"\n'))


def test_unknown_policy_option_in_model_section_names_the_model(tmp_path):
    path = write_toml(tmp_path, """
        [models.llm]
        policy = "sticky"
        options = { cache_threshold = 0.5 }
    """)
    with pytest.raises(ConfigError, match="models.llm: .*unknown option 'cache_threshold'"):
        load_config(path)


@pytest.mark.parametrize("text", [
    '[models.llm]\noptions = { cache_threshold = 0.5 }\n',  # no policy
    '[dns]\ngrpc_port = 8001\n',  # no name
    '[dns]\nname = "svc"\nport = 1\n',  # unknown key
    '[[instances]]\naddress = "a:1"\nweight = 2\n',  # unknown key
    'models = { llm = "prefix" }\n',  # not a table
])
def test_malformed_sections_are_config_errors(tmp_path, text):
    with pytest.raises(ConfigError, match="bad instances/dns/models section"):
        load_config(write_toml(tmp_path, text))


def test_bad_instance_address_in_file_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="instances.address: expected host:port"):
        load_config(write_toml(tmp_path, 'instances = ["localhost"]\n'))


def test_wrong_type_in_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="grpc_port"):
        load_config(write_toml(tmp_path, 'grpc_port = "8001"\n'))


@pytest.mark.parametrize("settings", [
    {"interval_s": 0}, {"grpc_port": 0}, {"metrics_port": 70000}, {"name": ""},
], ids=["interval", "grpc_port", "metrics_port", "name"])
def test_bad_dns_settings_are_rejected(settings):
    field = next(iter(settings))
    with pytest.raises(ConfigError, match=f"dns.{field}"):
        DnsConfig(**{"name": "triton.svc", **settings})


# -- CLI: policy options -----------------------------------------------------------------

def _cli_config(*flags: str):
    from router.cli import build_config, parse_args

    return build_config(parse_args(["--instance", "127.0.0.1:9001", *flags]))


def test_policy_options_from_the_command_line_reach_the_default_policy(tmp_path):
    config = _cli_config("--policy", "prefix", "--policy-option", "load_weight=0.25",
                         "--policy-option", "balance_abs_threshold=8")
    assert config.default_policy_options == {"load_weight": 0.25, "balance_abs_threshold": 8}
    policy = create_policy(config.default_policy, config.default_policy_options)
    assert policy.config.load_weight == 0.25 and policy.config.balance_abs_threshold == 8
    # Over the file's options, keeping the ones the flags do not name.
    path = tmp_path / "router.toml"
    path.write_text('default_policy = "kv_aware"\n'
                    "default_policy_options = { overlap_weight = 2.0, waiting_weight = 0.5 }\n")
    config = _cli_config("--config", str(path), "--policy-option", "overlap_weight=4")
    assert config.default_policy_options == {"overlap_weight": 4, "waiting_weight": 0.5}


@pytest.mark.parametrize(("flag", "message"), [
    ("load_weight", "expects NAME=VALUE"),
    ("=0.1", "expects NAME=VALUE"),
    ("no_such_option=1", "unknown option 'no_such_option'"),
    ("load_weight=-1", "option 'load_weight' must be >= 0.0"),
    ("load_weight=high", "option 'load_weight' must be"),
])
def test_bad_policy_options_from_the_command_line_are_config_errors(flag, message):
    with pytest.raises(ConfigError, match=message):
        _cli_config("--policy", "prefix", "--policy-option", flag)
