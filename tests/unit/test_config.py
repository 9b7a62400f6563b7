"""Config precedence (flags > MESH_* env > file > defaults) and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.cli import build_parser, field_docs, load_config
from mesh.config import BootstrapConfig, PeerConfig, UpConfig, describe, load_file, resolve
from mesh.errors import ConfigError


def test_defaults_when_nothing_is_given() -> None:
    config = resolve(PeerConfig, {"run": "r"}, env={})
    assert (config.port, config.device, config.compression, config.join) == (0, "auto", "none", ())
    assert resolve(BootstrapConfig, {}, env={}).port == 31337


def test_precedence_flags_over_env_over_file_over_defaults() -> None:
    file = {"matchmaking_time": 7.0, "lr": 0.5, "batch_size": 8, "run": "from-file"}
    env = {"MESH_LR": "0.25", "MESH_BATCH_SIZE": "4"}
    config = resolve(PeerConfig, {"batch_size": "2"}, env=env, file=file)
    assert config.batch_size == 2  # flag
    assert config.lr == 0.25  # env beats file
    assert config.matchmaking_time == 7.0  # file beats default
    assert config.run == "from-file"
    assert config.averaging_timeout == 30.0  # default


def test_env_types_are_coerced() -> None:
    env = {"MESH_RUN": "r", "MESH_CLIENT_MODE": "true", "MESH_JOIN": "/a,/b", "MESH_CHECKPOINT_DIR": "/tmp/x", "MESH_MAX_EPOCHS": "3"}
    config = resolve(PeerConfig, {}, env=env)
    assert config.client_mode is True
    assert config.join == ("/a", "/b")
    assert config.checkpoint_dir == Path("/tmp/x")
    assert config.max_epochs == 3


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"run": "r", "port": "70000"}, "--port must be between 0 and 65535"),
        ({"run": "r", "port": "abc"}, "--port must be int"),
        ({"run": "r", "compression": "zip"}, "--compression must be one of none, fp16, 8bit"),
        ({"run": "r", "device": "tpu"}, "--device must be one of auto, cpu, cuda"),
        ({"run": "r", "lr": "-1"}, "--lr must be > 0"),
        ({"run": "r", "client_mode": "maybe"}, "--client-mode must be bool"),
        ({"run": "bad id!"}, "invalid run id 'bad id!'"),
        ({}, "--run is required"),
        ({"run": "r", "log_format": "xml"}, "--log-format must be one of text, json"),
        ({"run": "r", "device": "cuda:x"}, "--device must be one of auto, cpu, cuda or cuda:N"),
        ({"run": "r", "data_plane": "mpi"}, "--data-plane must be one of gloo, nccl, hivemind"),
        ({"run": "r", "average_state_every": "0"}, "--average-state-every must be > 0"),
        ({"run": "r", "averaging": "gossip"}, "--averaging must be one of gradients, local, diloco"),
        ({"run": "r", "inner_steps": "0"}, "--inner-steps must be > 0"),
        ({"run": "r", "outer_lr": "0"}, "--outer-lr must be > 0"),
        ({"run": "r", "outer_momentum": "1"}, "--outer-momentum must be in .0, 1., got 1.0"),
    ],
)
def test_invalid_values_name_the_flag(flags: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        resolve(PeerConfig, flags, env={})


def test_a_gpu_per_peer_and_the_data_plane_settings() -> None:
    config = resolve(PeerConfig, {"run": "r", "device": "cuda:1", "data_plane": "hivemind"}, env={})
    assert (config.device, config.data_plane, config.data_plane_host) == ("cuda:1", "hivemind", None)
    assert resolve(PeerConfig, {"run": "r"}, env={}).data_plane == "gloo"


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="MESH_PORT must be int"):
        resolve(PeerConfig, {"run": "r"}, env={"MESH_PORT": "eighty"})


def test_config_file_toml_sections_and_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "mesh.toml"
    path.write_text('lr = 0.1\nrun = "r"\n[peer]\nlr = 0.2\n[bootstrap]\nport = 4000\n')
    assert resolve(PeerConfig, {}, env={}, file=load_file(path, "peer")).lr == 0.2
    assert resolve(BootstrapConfig, {}, env={}, file={"port": 4000}).port == 4000
    path.write_text('run = "r"\nlearning_rate = 1\n')
    with pytest.raises(ConfigError, match="unknown setting.*learning_rate"):
        resolve(PeerConfig, {}, env={}, file=load_file(path, "peer"))


def test_a_config_files_task_table_holds_the_task_arguments_and_flags_add_to_it(tmp_path: Path, monkeypatch) -> None:
    from mesh.config import parse_task_args

    path = tmp_path / "mesh.toml"
    path.write_text('[peer]\nrun = "r"\ntask = "mesh.examples.user_task:make_task"\n[task]\nhidden = 32\nname = "wide"\n')
    config = resolve(PeerConfig, {}, env={}, file=load_file(path, "peer"))
    assert config.task == "mesh.examples.user_task:make_task"
    assert parse_task_args(config.task_arg) == {"hidden": 32, "name": "wide"}
    flagged = resolve(PeerConfig, {"task_arg": ("hidden=8", "extra=true")}, env={}, file=load_file(path, "peer"))
    assert parse_task_args(flagged.task_arg) == {"hidden": 8, "name": "wide", "extra": True}  # a flag wins per key
    up = resolve(UpConfig, {}, env={}, file=load_file(path, "up"))
    assert parse_task_args(up.task_arg) == {"hidden": 32, "name": "wide"}  # mesh up passes them to its peers
    monkeypatch.delenv("MESH_CONFIG", raising=False)
    args = build_parser().parse_args(["peer", "--run", "r", "--task-arg", "hidden=4", "--task-arg", "x=y"])
    assert load_config("peer", args).task_arg == ("hidden=4", "x=y")


def test_config_file_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_file(tmp_path / "missing.toml", "peer")
    broken = tmp_path / "broken.toml"
    broken.write_text("lr = = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_file(broken, "peer")


def test_cli_flags_reach_the_config_and_join_repeats(monkeypatch) -> None:
    monkeypatch.delenv("MESH_CONFIG", raising=False)
    args = build_parser().parse_args(["peer", "--run", "r", "--join", "/a", "--join", "/b", "--no-client-mode", "--lr", "0.3"])
    config = load_config("peer", args)
    assert config.join == ("/a", "/b") and config.client_mode is False and config.lr == 0.3


def test_every_field_has_a_flag_with_help_naming_its_env_var() -> None:
    parser = build_parser()
    for command, cls in [("peer", PeerConfig), ("bootstrap", BootstrapConfig), ("up", UpConfig)]:
        sub = parser._subparsers._group_actions[0].choices[command]
        helps = {a.dest: a.help for a in sub._actions}
        docs = field_docs(cls)
        for name in cls.__dataclass_fields__:
            assert f"MESH_{name.upper()}" in helps[name]
            assert docs.get(name), f"{cls.__name__}.{name} has no docstring"


def test_describe_lists_every_setting() -> None:
    line = describe(resolve(PeerConfig, {"run": "r", "join": ("/a",)}, env={}))
    assert "run=r" in line and "join=/a" in line and "compression=none" in line


def test_a_coordinators_unset_hyperparameters_leave_the_tasks_defaults() -> None:
    from mesh.session import coordinator_hyperparameters as _hyperparameters

    run = {"hyperparameters": {"lr": None, "optimizer": None, "batch_size": 8, "target_batch_size": None, "seed": 3}}
    assert _hyperparameters(run) == {"batch_size": 8, "seed": 3}


def _configs_with(section: type) -> list[type]:
    import dataclasses

    import mesh.config as config

    return [
        c
        for c in vars(config).values()
        if isinstance(c, type) and dataclasses.is_dataclass(c) and issubclass(c, section) and c is not section
    ]


REQUIRED = {"PeerConfig": {"run": "r"}, "ExportConfig": {"checkpoint_dir": Path("ckpt"), "out": Path("m.safetensors")}}
INVALID_BY_SECTION = {  # one invalid value per section's validated fields
    "NetworkConfig": [{"port": 70000}, {"join_timeout": -1}],
    "LogConfig": [{"log_format": "xml"}],
    "RunDefaults": [{"lr": -1.0}, {"compression": "zip"}],
}


@pytest.mark.parametrize("section", sorted(INVALID_BY_SECTION))
def test_every_section_of_every_config_is_validated(section: str) -> None:
    """Issue 10: DoctorConfig(port=70000, join_timeout=-1) was accepted (its mixins' __post_init__ chain stopped)."""
    import mesh.config as config

    classes = _configs_with(getattr(config, section))
    assert classes, section
    required = REQUIRED
    for klass in classes:
        klass(**required.get(klass.__name__, {}))  # valid as built
        for invalid in INVALID_BY_SECTION[section]:
            with pytest.raises(ConfigError):
                klass(**required.get(klass.__name__, {}), **invalid)


def test_doctor_config_checks_its_network_settings() -> None:
    from mesh.config import DoctorConfig

    with pytest.raises(ConfigError, match="port"):
        DoctorConfig(port=70000)
    with pytest.raises(ConfigError, match="join-timeout"):
        DoctorConfig(join_timeout=-1)


def test_describe_redacts_every_secret_field_of_every_config() -> None:
    import dataclasses
    import re

    import mesh.config as config

    secret_like = re.compile(r"token|password|secret|mongo_url|key$")
    classes = _configs_with(config.Section)
    seen = set()
    for klass in classes:
        fields = {f.name for f in dataclasses.fields(klass)}
        # a new secret-looking field must be listed in SECRET_FIELDS (identity is a file path, not a secret)
        assert {f for f in fields if secret_like.search(f)} <= set(config.SECRET_FIELDS), klass.__name__
        secrets = {
            name: f"mongodb://user:hunter2-{name}@db:27017" if name == "mongo_url" else f"hunter2-{name}"
            for name in config.SECRET_FIELDS
            if name in fields
        }
        seen |= set(secrets)
        built = klass(**REQUIRED.get(klass.__name__, {}), **secrets)
        line = config.describe(built)
        assert "hunter2" not in line, (klass.__name__, line)
        for name in secrets:
            assert f"{name}=***" in line
    assert seen == set(config.SECRET_FIELDS)  # every secret field exists somewhere and was checked


def test_a_bad_mongo_url_is_not_echoed() -> None:
    from mesh.config import ApiConfig

    with pytest.raises(ConfigError) as caught:
        ApiConfig(mongo_url="mongo://admin:hunter2@db")
    assert "hunter2" not in str(caught.value) and "mongo://" in str(caught.value)


def test_mesh_up_hands_every_run_setting_to_its_peers(tmp_path: Path, monkeypatch) -> None:
    """Each RunDefaults field given to mesh up reaches its peers' config (a new setting cannot be dropped silently)."""
    import dataclasses

    from mesh.config import RunDefaults
    from mesh.up import _peer_args

    monkeypatch.delenv("MESH_CONFIG", raising=False)
    given = {
        "batch_size": 8,
        "target_batch_size": 96,
        "optimizer": "adamw",
        "lr": 0.01,
        "weight_decay": 0.05,
        "lr_schedule": "linear",
        "warmup_epochs": 2,
        "total_epochs": 30,
        "clip_grad_norm": 0.5,
        "averaging": "local",
        "inner_steps": 7,
        "outer_lr": 0.5,
        "outer_momentum": 0.3,
        "compression": "none",
        "aggregation": "clipped",
        "matchmaking_time": 1.5,
        "averaging_timeout": 12.0,
        "average_state_every": 4,
        "seed": 9,
    }
    assert set(given) == {f.name for f in dataclasses.fields(RunDefaults)}  # a new setting: add it here
    up = UpConfig(**given, task_arg=("hidden=4",), max_epochs=5)
    args = _peer_args(up, "/ip4/127.0.0.1/tcp/1/p2p/x", 0, tmp_path, 1, "http://127.0.0.1:1", 9000)
    peer = load_config("peer", build_parser().parse_args(args))
    assert {name: getattr(peer, name) for name in given} == given
    assert peer.task_arg == ("hidden=4",) and peer.max_epochs == 5


def test_a_coordinators_run_with_the_tasks_own_optimizer_gives_a_valid_peer_config() -> None:
    """A run recorded with optimizer=task (a task's make_optimizer), read back from the coordinator by a new peer."""
    import dataclasses

    from mesh.session import coordinator_hyperparameters as _hyperparameters

    hyper = _hyperparameters({"hyperparameters": {"optimizer": "task", "lr": 0.05, "target_batch_size": 64}})
    config = dataclasses.replace(PeerConfig(run="r"), **hyper)
    assert config.optimizer is None and config.lr == 0.05 and config.target_batch_size == 64
