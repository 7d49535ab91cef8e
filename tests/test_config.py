"""Config sources in precedence order: CLI flags > SWARM_* environment > TOML file > defaults."""

import pytest

from conftest import BIN
from peer.cli import build_parser, config_from_args
from peer.config import FIELD_SECTION, load_config
from peer.errors import ConfigError


@pytest.fixture
def toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('max_steps = 30\n[optim]\nlr = 0.01\nwarmup_steps = 7\n[train]\nseed = 5\nbatch_size = 16\n')
    return path


def test_precedence_cli_over_env_over_toml_over_default(toml, monkeypatch):
    monkeypatch.setenv("SWARM_LR", "0.02")
    monkeypatch.setenv("SWARM_SEED", "9")
    cfg = load_config({"seed": 11}, toml)
    assert cfg.train.seed == 11  # CLI beats env and TOML
    assert cfg.optim.lr == 0.02  # env beats TOML
    assert cfg.optim.warmup_steps == 7 and cfg.train.max_steps == 30 and cfg.train.batch_size == 16  # TOML
    assert cfg.optim.beta2 == 0.95 and cfg.model.preset == "llama-14m"  # defaults


def test_cli_flags_reach_the_config_through_argparse(toml, monkeypatch):
    monkeypatch.setenv("SWARM_CONFIG", str(toml))
    args = build_parser().parse_args(["baseline", "--max-steps", "3", "--no-progress", "--precision", "bf16"])
    cfg = config_from_args(args)
    assert (cfg.train.max_steps, cfg.log.progress, cfg.train.precision, cfg.optim.lr) == (3, False, "bf16", 0.01)


def test_bad_values_name_the_field_and_where_to_set_it(monkeypatch):
    with pytest.raises(ConfigError, match=r"train\.max_steps = 0: .*greater than or equal to 1.*--max-steps"):
        load_config({"max_steps": 0})
    monkeypatch.setenv("SWARM_LR", "fast")
    with pytest.raises(ConfigError, match=r"optim\.lr = 'fast'.*SWARM_LR"):
        load_config({})
    monkeypatch.delenv("SWARM_LR")
    with pytest.raises(ConfigError, match="multiple of microbatch_size"):
        load_config({"batch_size": 10, "microbatch_size": 4})
    with pytest.raises(ConfigError, match="min_lr .* must not exceed lr"):
        load_config({"lr": 1e-4, "min_lr": 1e-3})


def test_toml_errors_are_readable(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nmax_step = 3\n")
    with pytest.raises(ConfigError, match="unknown key \\[train\\] max_step .*did you mean 'max_steps'"):
        load_config({}, bad)
    bad.write_text("max_steps = = 3\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config({}, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config({}, tmp_path / "missing.toml")


def test_every_field_has_a_docstring_for_help():
    from peer.config import field_info

    assert all(field_info(name).description for name in FIELD_SECTION)


def test_cli_error_is_one_line_with_exit_code_2(tmp_path):
    import subprocess

    proc = subprocess.run([str(BIN / "swarm-peer"), "baseline", "--microbatch-size", "5", "--run-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "multiple of microbatch_size" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def _flags_of(command: str) -> set[str]:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    return {option for action in sub._actions for option in action.option_strings
            if option.startswith("--") and not option.startswith("--no-")}


def test_each_command_takes_exactly_the_fields_its_sections_name():
    from peer.config import COMMANDS, SHARED_FIELDS, SWARM_RUN, command_fields, field_commands, flag_name

    common = {"--config", "--json", "--debug", "--help"}
    extra = {"inspect": {"--watch", "--timeout"}, "health": {"--address", "--timeout"},
             "invite": {"--member-key", "--role", "--expires"},
             "simulate": {"--peers", "--duration", "--scenario", "--trace", "--out"}}
    for command in COMMANDS:
        assert _flags_of(command) == common | extra.get(command, set()) | {
            flag_name(f) for f in command_fields(command)}, command
    assert all(field_commands(name) for name in FIELD_SECTION), "a field no command takes is dead"
    for command in SWARM_RUN:  # every swarm command can insist on (and publish) the run's shared config
        assert set(SHARED_FIELDS) <= set(command_fields(command)), command
    # the ones a hand-kept list once lost or confused
    assert "partition" in command_fields("pipeline")
    assert "in_flight" not in command_fields("join") and "stage" not in command_fields("train")
    assert set(command_fields("health")) == {"host", "port"}


def test_a_key_in_the_wrong_section_says_where_it_belongs(tmp_path):
    old = tmp_path / "old.toml"
    old.write_text("[swarm]\nin_flight = 2\n")  # [swarm] was split into [peer], [trainer] and [link]
    with pytest.raises(ConfigError, match=r"\[swarm\] in_flight .*belongs in \[trainer\]"):
        load_config({}, old)
    old.write_text("[peers]\nfoo = 2\n")
    with pytest.raises(ConfigError, match=r"unknown key \[peers\] .*did you mean 'peer'"):
        load_config({}, old)
    good = tmp_path / "good.toml"
    good.write_text("[trainer]\nin_flight = 2\n[link]\ncodec = 'int8'\n[peer]\nstage = '1'\n")
    cfg = load_config({}, good)
    assert (cfg.trainer.in_flight, cfg.link.codec, cfg.peer.stage) == (2, "int8", "1")


def test_with_defaults_fills_only_what_the_user_left_unset(monkeypatch):
    monkeypatch.setenv("SWARM_MAX_STEPS", "7")
    cfg = load_config({"lr": 0.01}).with_defaults({"max_steps": 30, "lr": 2e-3, "warmup_steps": 5})
    assert (cfg.train.max_steps, cfg.optim.lr, cfg.optim.warmup_steps) == (7, 0.01, 5)
    explicit = cfg.explicit_fields()  # a default stays a default: another layer may replace it
    assert {"max_steps", "lr"} <= explicit and "warmup_steps" not in explicit
    assert cfg.with_defaults({"warmup_steps": 9, "max_steps": 1}).optim.warmup_steps == 9


def test_a_command_s_own_defaults_give_way_to_anything_the_user_sets(monkeypatch):
    parse = build_parser().parse_args
    cfg = config_from_args(parse(["demo"]))
    assert (cfg.train.max_steps, cfg.net.update_period, cfg.log.log_interval) == (30, 3.0, 1)  # the demo's
    monkeypatch.setenv("SWARM_UPDATE_PERIOD", "7")
    cfg = config_from_args(parse(["demo", "--max-steps", "5"]))
    assert (cfg.train.max_steps, cfg.net.update_period, cfg.optim.warmup_steps) == (5, 7.0, 5)
    assert config_from_args(parse(["baseline"])).train.max_steps == 1000  # other commands keep the field's
