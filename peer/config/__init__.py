"""Run configuration: pydantic models, one section per concern (:mod:`.sections`), what follows from a
field's name (:mod:`.fields`), and the loader (:mod:`.run`).

Every field is reachable three ways, all derived from its name (``max_steps`` here):

* the command-line flag ``--max-steps`` (highest precedence),
* the environment variable ``SWARM_MAX_STEPS``,
* the TOML key ``max_steps`` in its section (``[train]``) of ``--config run.toml``
  (a top-level key is accepted too),

and otherwise its default. Field names are unique across sections so that the flat
flag / environment names stay unambiguous. The docstring under each field is its
``--help`` text.
"""

from peer.config.fields import (  # noqa: F401 (the package's API)
    ENV_PREFIX, SHARED_FIELDS, command_fields, env_name, field_commands, field_info, flag_name, is_list_field, nest,
)
from peer.config.run import DEFAULT_SWARM_RUN, RunConfig, load_config  # noqa: F401
from peer.config.sections import (  # noqa: F401
    COMMAND_DEFAULTS, COMMANDS, FIELD_SECTION, LOCAL_RUNS, SECTIONS, SWARM_RUN, TRAINING, DataConfig, DemoConfig,
    LinkConfig, LogConfig, ModelConfig, NetConfig, OptimConfig, PeerConfig, PipelineConfig, Section, TrainConfig,
    TrainerConfig,
)
