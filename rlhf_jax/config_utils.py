"""Running a config: load it, check it, write `<workdir>/config.json`, call its trainer.

experiments/launch.py is only the command line around this module; a notebook does the same
run with

  from rlhf_jax import config_utils
  config = config_utils.load_config("configs/sft.py:runlocal")
  config.total_steps = 20  # get_config returns an unlocked ConfigDict
  config_utils.run(config, workdir="/tmp/sft")

Decisions (see also experiments/launch.py):

  Trainer     `config.trainer` names a module: a bare name ("sft") means
              `rlhf_jax.trainers.sft`; a dotted name ("tests.fixtures.dummy_trainer") is
              imported as written, so tests and forks can plug in their own trainer. The
              module's `train(config, workdir)` is called and its result returned.
  config.json The resolved config (FieldReferences followed, tuples as lists), strict JSON
              with sorted keys, written by process 0 only, atomically (temp file +
              os.replace) so a reader never sees half a file. Non-finite floats are written
              as the strings "nan", "inf", "-inf" because JSON has no such numbers.
  Workdir     Default `runs/<config file stem>[_<arg>]`, relative to the current directory
              (see `default_workdir`). Overrides (--config.x=y) do not change it: give
              --workdir when two runs differ only in overrides, or they share (and resume)
              one workdir.
  Errors      Mistakes in the config or on the command line raise ConfigError, a ValueError
              whose message names the dotted key and suggests the nearest valid ones.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import json
import math
import os
import pkgutil
import re
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
from absl import logging
from ml_collections.config_flags import config_path
from ml_collections.config_flags.config_flags import UnsupportedOperationError

from rlhf_jax import errors, utils

CONFIG_FILENAME = "config.json"
RUN_LOCK = ".run_lock"  # held by process 0 while a run is in its workdir
TRAINERS_PACKAGE = "rlhf_jax.trainers"
DEFAULT_RUNS_DIR = "runs"

# Environment variables that mean "this process is one of several in a JAX job".
_DISTRIBUTED_ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")
_DISTRIBUTED_COUNT_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
_TPU_HOST_LIST_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")


# A config or command-line override that cannot run; the message says how to fix it.
ConfigError = errors.ConfigError


# ------------------------------------------------------------------------------------------------
# Loading and naming.
# ------------------------------------------------------------------------------------------------


def split_config_spec(spec: str) -> tuple[str, str | None]:
  """Splits "configs/sft.py:runlocal,seed=3" into ("configs/sft.py", "runlocal,seed=3").

  The first colon separates path and arg, as in ml_collections.config_flags.
  """
  path, colon, arg = spec.partition(":")
  return path, (arg if colon else None)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads a config file the way `--config=FILE[:ARG]` does: `get_config(ARG)` or `get_config()`.

  Args:
    spec: a path to a Python file, optionally followed by ":" and the arg string.
  Returns:
    Whatever the file's get_config returns (a ConfigDict for a well-formed config), unlocked.
  Raises:
    ConfigError: when the file does not exist or has no get_config.
  """
  _, arg, get_config = file_function(spec, "get_config", kind="Config", flag="config")
  return get_config() if arg is None else get_config(arg)


def file_function(spec: str, function: str, *, kind: str, flag: str) -> tuple[str, str | None, Any]:
  """(path, arg, the function) of a Python file named by `spec` = "FILE[:ARG]".

  The file is imported under a private module name and registered like any import, so that
  dataclasses and pickling inside it work. Used for config files (`get_config`) and sweep
  files (`get_sweep`); `kind` and `flag` name them in the errors.

  Raises:
    ConfigError: when the file does not exist or does not define `function`.
  """
  path, arg = split_config_spec(spec)
  if not os.path.isfile(path):
    raise ConfigError(f"{kind} file {path!r} not found (from --{flag}={spec}).")
  stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
  name = f"_rlhf_jax_{kind.lower()}_{stem}"
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[name] = module
  module_spec.loader.exec_module(module)
  fn = getattr(module, function, None)
  if not callable(fn):
    raise ConfigError(f"{kind} file {path!r} defines no {function}(arg=None) function.")
  return path, arg, fn


def default_workdir(spec: str, runs_dir: str = DEFAULT_RUNS_DIR) -> str:
  """The workdir a run gets without --workdir: `<runs_dir>/<file stem>[_<arg>]`.

  The arg is part of the name so that `sft.py` and `sft.py:runlocal` never resume each
  other's checkpoints. Every run of characters other than letters, digits and `._=+-` in the
  arg becomes one "_":

    configs/sft.py                   -> runs/sft
    configs/sft.py:runlocal          -> runs/sft_runlocal
    configs/sft.py:runlocal,seed=3   -> runs/sft_runlocal_seed=3
    configs/ppo.py:size=1.4b         -> runs/ppo_size=1.4b

  Args:
    spec: the --config value, "FILE[:ARG]".
    runs_dir: parent folder, relative to the current directory unless absolute.
  """
  path, arg = split_config_spec(spec)
  name = os.path.splitext(os.path.basename(path))[0]
  if arg:
    suffix = re.sub(r"[^A-Za-z0-9._=+-]+", "_", arg).strip("_")
    if suffix:
      name = f"{name}_{suffix}"
  return os.path.join(runs_dir, name)


# ------------------------------------------------------------------------------------------------
# Keys, suggestions and command-line override errors.
# ------------------------------------------------------------------------------------------------


def config_keys(config: Mapping[str, Any] | ml_collections.ConfigDict) -> list[str]:
  """All dotted keys of a config, sections and leaves, sorted: ["optim", "optim.lr", ...]."""
  keys = []
  for key, value in config.items():
    keys.append(key)
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      keys.extend(f"{key}.{child}" for child in config_keys(value))
  return sorted(keys)


def _type_name(value: Any) -> str:
  return type(value).__name__


def _listing(names: Sequence[str], limit: int = 25) -> str:
  names = sorted(names)
  if len(names) > limit:
    return ", ".join(names[:limit]) + f", ... ({len(names) - limit} more)"
  return ", ".join(names) or "(none)"


def closest_keys(key: str, candidates: Sequence[str], n: int = 3) -> list[str]:
  """The candidates most similar to the dotted `key`, best first.

  A candidate scores the difflib ratio of the whole keys, or 0.9 times the ratio of their
  last components when that is higher, so `lr` finds `optim.lr`. Scores below 0.6 are
  dropped, and so is anything more than 0.1 behind the best: a clear winner comes alone.
  """
  last = key.rsplit(".", 1)[-1]
  scored = []
  for candidate in candidates:
    score = max(
      difflib.SequenceMatcher(None, key, candidate).ratio(),
      0.9 * difflib.SequenceMatcher(None, last, candidate.rsplit(".", 1)[-1]).ratio(),
    )
    if score >= 0.6:
      scored.append((score, candidate))
  scored.sort(key=lambda item: (-item[0], item[1]))
  if not scored:
    return []
  best = scored[0][0]
  return [candidate for score, candidate in scored[:n] if score >= best - 0.1]


def check_key(
  config: ml_collections.ConfigDict, key: str, prefix: str = "config", source: str = ""
) -> None:
  """Raises ConfigError unless the dotted `key` exists in `config`.

  The message names the full key (`prefix.key`) and `source` (what the user typed), suggests
  the closest existing keys and lists the keys of the deepest section that does exist.
  """
  where = f" (from {source})" if source else ""
  node: Any = config
  parts = key.split(".")
  for depth, part in enumerate(parts):
    here = ".".join([prefix, *parts[:depth]])
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
      raise ConfigError(
        f"Unknown config key {prefix}.{key}{where}: {here} holds the "
        f"{_type_name(node)} {node!r}, not a section with fields."
      )
    if part not in node:
      message = f"Unknown config key {prefix}.{key}{where}."
      close = closest_keys(key, config_keys(config))
      if close:
        message += " Did you mean " + " or ".join(f"{prefix}.{c}" for c in close) + "?"
      message += f" Keys in {here}: {_listing(list(node.keys()))}."
      raise ConfigError(message)
    node = node[part]


def set_key(config: ml_collections.ConfigDict, key: str, value: Any, source: str = "") -> None:
  """`config.<key> = value` for a dotted key that must exist, naming `source` when it does not.

  ConfigDict's own type check refuses a value of the wrong type (a TypeError naming the
  field, turned into a ConfigError here). A list given for a tuple field (JSON has no tuples)
  becomes a tuple.
  """
  check_key(config, key, source=source)
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  if isinstance(node[leaf], tuple) and isinstance(value, list):
    value = tuple(value)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as error:
    where = f" (from {source})" if source else ""
    raise ConfigError(f"config.{key} = {value!r}{where}: {error}") from None


def parse_set_args(items: Sequence[str], flag: str = "--set") -> dict[str, Any]:
  """`["kl.coef=0.1", "optim.name=adam"]` as {key: value}, each value read as JSON if it is.

  Raises:
    ConfigError: for an item without "=".
  """
  out: dict[str, Any] = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ConfigError(f"{flag}={item!r}: expected key=value.")
    key = key.removeprefix("config.")
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def parse_override_args(argv: Sequence[str], name: str = "config") -> dict[str, str | None]:
  """The `--config.KEY[=VALUE]` overrides in `argv`, as {KEY: raw value text or None}.

  Mirrors how ml_collections.config_flags finds them (`--name.key`, `-name.key`,
  `--noname.key`), so error messages can name what the user typed. A value given as the
  next argument (`--config.key value`) is picked up too.
  """
  overrides: dict[str, str | None] = {}
  pattern = re.compile(rf"^--?(no)?{re.escape(name)}\.([^=]+)(=(.*))?$", re.DOTALL)
  for i, arg in enumerate(argv):
    match = pattern.match(arg)
    if not match:
      continue
    negated, key, has_value, value = match.groups()
    if negated:
      value = "false"
    elif has_value is None:
      following = argv[i + 1] if i + 1 < len(argv) else None
      value = following if following is not None and not following.startswith("-") else None
    overrides.pop(key, None)  # Last one wins, as in config_flags.
    overrides[key] = value
  return overrides


def find_config_spec(argv: Sequence[str], name: str = "config") -> str | None:
  """The value of `--config=...` (or `--config ...`) in argv, or None."""
  for i, arg in enumerate(argv):
    match = re.match(rf"^--?{re.escape(name)}(=(.*))?$", arg, re.DOTALL)
    if match:
      if match.group(1) is not None:
        return match.group(2)
      return argv[i + 1] if i + 1 < len(argv) else None
  return None


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node: Any = config
  for part in key.split("."):
    node = node[part]
  return node


def explain_override_error(
  argv: Sequence[str], error: BaseException, name: str = "config"
) -> str | None:
  """A clear message for an error that parsing `--config` and its overrides raised.

  ml_collections.config_flags refuses an unknown key with a raw AttributeError/KeyError
  naming only the last path component, and a wrong type with the parser's message. This
  reloads the config named in argv and works out which override is at fault:

    unknown key   names the full dotted key, the closest valid keys and the keys of the
                  deepest existing section;
    wrong type    names the key, its declared type and value, and the value typed;
    None field    explains that a field whose default is None has no type to parse into;
    config file   a missing file, or a ValueError/TypeError raised by get_config (e.g. an
                  unknown key in the arg string), is reported in one line with its location.

  Args:
    argv: the command line (flagfiles already expanded).
    error: what flag parsing raised.
    name: the config flag's name.
  Returns:
    The message, or None when the error is not one of these (the caller then shows the
    original error).
  """
  spec = find_config_spec(argv, name)
  if spec is None:
    return None
  try:
    config = load_config(spec)
  except ConfigError as load_error:
    return str(load_error)
  except (ValueError, TypeError) as load_error:
    frame = traceback.extract_tb(load_error.__traceback__)[-1]
    return (
      f"get_config failed for --{name}={spec}: {load_error} "
      f"({type(load_error).__name__} at {frame.filename}:{frame.lineno})"
    )
  if not isinstance(config, ml_collections.ConfigDict):
    return f"get_config in --{name}={spec} returned {_type_name(config)}, not a ConfigDict."
  # Indexed keys (`--config.layers[0]=...`, which config_flags allows) are not checked here.
  overrides = {k: v for k, v in parse_override_args(argv, name).items() if "[" not in k}
  for key, value in overrides.items():
    typed = f"--{name}.{key}" if value is None else f"--{name}.{key}={value}"
    try:
      check_key(config, key, prefix=name, source=typed)
    except ConfigError as key_error:
      return str(key_error)
  for key, value in overrides.items():
    typed = f"--{name}.{key}" if value is None else f"--{name}.{key}={value}"
    if (
      isinstance(error, UnsupportedOperationError)
      and f"{name}.{key} " in str(error)
      and _get(config, key) is None
    ):
      return (
        f"Cannot override {name}.{key} (from {typed}): its default is None, so it has no "
        "type to parse the value into. Declare it in the config file as "
        "ml_collections.config_dict.placeholder(int) (or float, str, ...)."
      )
    # absl's value errors read "flag --config.key=value: reason".
    if re.search(rf"flag --{re.escape(name)}\.{re.escape(key)}[=:]", str(error)):
      reason = str(error).split(": ", 1)[-1]
      # get_type knows the declared type of placeholders, whose value is None.
      kind = config_path.get_type(key, config)
      return (
        f"Bad value for {name}.{key} (from {typed}): expected {getattr(kind, '__name__', kind)}"
        f" (the config's value is {_get(config, key)!r}); {reason}"
      )
  return None


# ------------------------------------------------------------------------------------------------
# config.json.
# ------------------------------------------------------------------------------------------------


def _jsonable(value: Any, key: str) -> Any:
  """Plain JSON data for a resolved config value; refuses anything else, naming the key."""
  if isinstance(value, (ml_collections.ConfigDict, dict)):
    return {str(k): _jsonable(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v, f"{key}[{i}]") for i, v in enumerate(value)]
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # "nan", "inf", "-inf": JSON has no such numbers.
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise ConfigError(
    f"config.{key} = {value!r} ({_type_name(value)}) cannot be written to {CONFIG_FILENAME}; "
    "configs hold only bools, numbers, strings, None, lists/tuples and sections."
  )


def config_to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON text with sorted keys (the content of config.json)."""
  # to_dict() resolves FieldReferences, so the file holds the values the trainer sees.
  plain = _jsonable(config.to_dict(), "")
  return json.dumps(plain, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_config_json(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes `<workdir>/config.json` atomically (call on process 0 only); returns its path."""
  text = config_to_json(config)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILENAME)
  if os.path.exists(path):
    _warn_if_changed(path, json.loads(text))
  with utils.atomic_open(path) as f:
    f.write(text)
  return path


def read_config_json(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was run with (tuples come back as lists)."""
  with open(os.path.join(workdir, CONFIG_FILENAME), encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  flat = {}
  for key, value in tree.items():
    flat.update(_flat(value, f"{prefix}.{key}" if prefix else key))
  return flat


def _warn_if_changed(path: str, new: dict[str, Any]) -> None:
  # A rerun in the same workdir resumes its checkpoints; say so when the config moved under it.
  try:
    with open(path, encoding="utf-8") as f:
      old = _flat(json.load(f))
  except (OSError, ValueError):
    return
  new_flat = _flat(new)
  changed = sorted(k for k in old.keys() | new_flat.keys() if old.get(k) != new_flat.get(k))
  if changed:
    logging.warning(
      "%s exists and differs from this run's config in: %s. Checkpoints in this workdir "
      "(if any) will be resumed under the new config.",
      path,
      _listing(changed, limit=10),
    )


# ------------------------------------------------------------------------------------------------
# Trainers.
# ------------------------------------------------------------------------------------------------


def _defines_train(path: str) -> bool:
  # Read, not imported: importing every trainer would pull in all their dependencies.
  try:
    with open(path, encoding="utf-8") as f:
      return re.search(r"^def train\(", f.read(), re.MULTILINE) is not None
  except OSError:
    return True  # Cannot tell (e.g. a zipped package): list it rather than hide it.


def available_trainers() -> list[str]:
  """Modules in rlhf_jax/trainers/ with a top-level `def train(` (values for `config.trainer`).

  Helpers next to the trainers (shared code without a train function) are left out.
  """
  package = importlib.import_module(TRAINERS_PACKAGE)
  names = []
  for info in pkgutil.iter_modules(package.__path__):
    if info.name.startswith("_") or info.ispkg:
      continue
    path = os.path.join(getattr(info.module_finder, "path", ""), info.name + ".py")
    if _defines_train(path):
      names.append(info.name)
  return sorted(names)


def trainer_module(name: Any, key: str = "config.trainer"):
  """Imports the trainer module that `key` (a config's `trainer` field) names.

  Args:
    name: "sft" for rlhf_jax.trainers.sft, or a dotted module path.
    key: the dotted config key holding `name`, for the error message.
  Raises:
    ConfigError: naming `key` when the module does not exist or has no train.
  """
  if not isinstance(name, str) or not name:
    raise ConfigError(
      f"{key} must be a non-empty string naming a trainer, got {name!r}. "
      f"Available trainers: {_listing(available_trainers())}."
    )
  module_name = name if "." in name else f"{TRAINERS_PACKAGE}.{name}"
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as error:
    # Only a missing trainer module is the config's fault; a missing dependency *inside* an
    # existing trainer must surface as itself.
    if error.name is None or not (module_name + ".").startswith(error.name + "."):
      raise
    message = f"{key} = {name!r}: there is no module {module_name}."
    if "." not in name:
      trainers = available_trainers()
      close = difflib.get_close_matches(name, trainers, n=1)
      if close:
        message += f" Did you mean {close[0]!r}?"
      message += f" Available trainers in rlhf_jax/trainers/: {_listing(trainers)}."
    raise ConfigError(message) from None
  if not callable(getattr(module, "train", None)):
    raise ConfigError(f"{key} = {name!r}: module {module_name} has no train(config, workdir).")
  return module


def get_trainer(name: Any):
  """The `train(config, workdir)` function of the trainer `config.trainer` names."""
  return trainer_module(name).train


def trainer_spec(name: Any, prefix: str = "config"):
  """The `CONFIG_SPEC` the trainer named `name` declares (None for a trainer without one)."""
  return getattr(trainer_module(name, f"{prefix}.trainer"), "CONFIG_SPEC", None)


def validate(config: ml_collections.ConfigDict, prefix: str = "config") -> None:
  """Checks every field of `config`, and of the upstream stages it will train, by the specs
  their trainers declare (`rlhf_jax.config_spec`); raises ConfigError naming the key."""
  spec = trainer_spec(config.get("trainer"), prefix)
  if spec is not None:
    spec.validate(config, prefix)


# ------------------------------------------------------------------------------------------------
# Multi-host.
# ------------------------------------------------------------------------------------------------


def detect_distributed(environ: Mapping[str, str] | None = None) -> str | None:
  """Why this process looks like one of several in a JAX job, or None when it does not.

  Known signs: JAX_COORDINATOR_ADDRESS or MEGASCALE_COORDINATOR_ADDRESS set; SLURM_NTASKS
  or OMPI_COMM_WORLD_SIZE above 1; TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES listing
  several hosts (a TPU pod slice). A multi-host job started some other way needs
  --jax_distributed.
  """
  environ = os.environ if environ is None else environ
  for var in _DISTRIBUTED_ENV_VARS:
    if environ.get(var):
      return f"{var} is set"
  for var in _DISTRIBUTED_COUNT_VARS:
    try:
      if int(environ.get(var, "1")) > 1:
        return f"{var}={environ[var]}"
    except ValueError:
      continue
  for var in _TPU_HOST_LIST_VARS:
    hosts = [h for h in environ.get(var, "").split(",") if h.strip()]
    if len(hosts) > 1:
      return f"{var} lists {len(hosts)} hosts"
  return None


def maybe_initialize_distributed(
  enabled: bool | None,
  *,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Calls jax.distributed.initialize() when asked, or (enabled=None) when detected.

  Must run before anything touches JAX devices. The coordinator address, process count
  and id are found by JAX's cluster detection (SLURM, Open MPI, TPU pods, ...) unless
  given; giving them runs a job of several processes on one machine or on hosts JAX
  does not detect. On CPU the processes' collectives go through gloo. Returns whether
  it initialized.
  """
  given = coordinator_address is not None or num_processes is not None
  reason = detect_distributed() if enabled is None else ("--jax_distributed" if enabled else None)
  if reason is None and given:
    reason = "--coordinator_address/--num_processes"
  if reason is None:
    return False
  logging.info("Initializing jax.distributed (%s).", reason)
  # CPU devices of several processes need a collectives backend; accelerators ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  return True


def log_environment() -> None:
  """Logs JAX version, backend, processes and devices (touches devices: after distributed)."""
  logging.info(
    "JAX %s, backend %s, process %d of %d, %d local / %d global devices.",
    jax.__version__,
    jax.default_backend(),
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  logging.info("Local devices: %s", jax.local_devices())


# ------------------------------------------------------------------------------------------------
# Compilation cache.
# ------------------------------------------------------------------------------------------------

COMPILATION_CACHE_ENV = "RLHF_JAX_COMPILATION_CACHE"
COMPILATION_CACHE_MAX_BYTES = 4 << 30
_OFF = ("0", "off", "false", "no", "none")


def compilation_cache_dir(environ: Mapping[str, str] | None = None) -> str | None:
  """Where JAX's persistent compilation cache lives for a run; None when it is off.

  `RLHF_JAX_COMPILATION_CACHE` decides: a folder, or 0/off to switch the cache off. Unset,
  it is JAX's own `JAX_COMPILATION_CACHE_DIR` when that is set, else
  `$XDG_CACHE_HOME/rlhf_jax/jax_compilation` (`~/.cache/...`): one cache per user, shared
  by every stage and run, so a stage that compiles what an earlier stage or run compiled
  (the same sampler, the same model shapes) loads the executable instead. The cache key is
  the program, the JAX version, the devices and the XLA flags, so a hit is the same
  executable a compile would give and results are unchanged.
  """
  env = os.environ if environ is None else environ
  value = env.get(COMPILATION_CACHE_ENV, "").strip()
  if value.lower() in _OFF:
    return None
  if value:
    return os.path.expanduser(value)
  if env.get("JAX_COMPILATION_CACHE_DIR"):
    return env["JAX_COMPILATION_CACHE_DIR"]
  base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "rlhf_jax", "jax_compilation")


def enable_compilation_cache(directory: str | None) -> str | None:
  """Points JAX's persistent compilation cache at `directory` (None: leaves it alone).

  Every compilation is cached (JAX's default keeps only those over 1 s; a stage's many
  small programs add up to seconds at every start), and the cache is capped at 4 GiB,
  least recently used first out. The cap also makes JAX take a file lock around reads and
  writes, which processes sharing the folder (a multi-process job on one host, parallel
  test workers) need. Settings the environment already gives JAX are kept.
  """
  if directory is None:
    return None
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)
  return directory


# ------------------------------------------------------------------------------------------------
# Run.
# ------------------------------------------------------------------------------------------------

TIMING_FILENAME = "timing.json"


def _duration(seconds: float) -> str:
  minutes, secs = divmod(round(seconds), 60)
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def timing_table(timings: Sequence[Mapping[str, Any]]) -> str:
  """The per-stage wall times of a run as printed at its end (one line per stage)."""
  lines = []
  for t in timings:
    what = "reused" if t["reused"] else _duration(t["seconds"])
    lines.append(f"  {t['stage']:<12} {what:>8}  {t['workdir']}")
  total = sum(t["seconds"] for t in timings if not t["reused"])
  lines.append(f"  {'total':<12} {_duration(total):>8}")
  return "\n".join(lines)


def _report_timings(timings: list[dict[str, Any]], workdir: str) -> None:
  """Logs the stage table and writes it to `<workdir>/timing.json` (process 0)."""
  logging.info(
    "Wall time by stage (this invocation; a resumed stage counts from its resume):\n%s",
    timing_table(timings),
  )
  if jax.process_index() != 0:
    return
  total = sum(t["seconds"] for t in timings if not t["reused"])
  record = {"stages": timings, "total_s": total}
  utils.write_json_atomic(os.path.join(workdir, TIMING_FILENAME), record)


def run(
  config: ml_collections.ConfigDict, workdir: str, *, timings: list[dict[str, Any]] | None = None
) -> Any:
  """Validates `config`, writes `<workdir>/config.json` (process 0) and calls its trainer.

  Everything that can be checked before training is checked first, so a bad config leaves
  no config.json behind. At the end, the wall time of every stage of the graph (trained or
  reused) is logged as a table and written to `<workdir>/timing.json`.

  Args:
    config: a resolved ConfigDict with a `trainer` field.
    workdir: the run's folder (created if missing).
    timings: the list an enclosing run collects stage times in (for upstream stages);
      None for the run that reports them.
  Returns:
    What the trainer's `train(config, workdir)` returns.
  Raises:
    ConfigError: for a config that is not a ConfigDict, lacks `trainer`, names an unknown
      trainer, has a field its trainer's spec refuses (the stage graph's, see `validate`) or
      holds values JSON cannot store, or whose workdir another process is running in
      (process 0 holds `<workdir>/.run_lock` for the whole run, so a second launcher, study
      or sweep on the same folder is refused before it writes anything).
  """
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"Expected a ConfigDict, got {_type_name(config)} (get_config's result).")
  if not workdir:
    raise ConfigError("workdir must be a non-empty path.")
  if "trainer" not in config:
    raise ConfigError(
      "The config has no field config.trainer naming the trainer to run; set e.g. "
      f'config.trainer = "sft". Available trainers: {_listing(available_trainers())}.'
    )
  train = get_trainer(config.trainer)
  validate(config)  # The whole stage graph, before anything is written or trained.
  text = config_to_json(config)  # Refuses non-JSON values before anything is written.
  logging.info("Resolved config:\n%s", text)
  with contextlib.ExitStack() as held:
    if jax.process_index() == 0:
      held.enter_context(utils.exclusive_dir(workdir, RUN_LOCK))
      path = write_config_json(config, workdir)
      logging.info("Wrote %s", path)
    top = timings is None
    timings = [] if timings is None else timings
    try:
      config = resolve_upstream(config, workdir, timings=timings)
      logging.info("Running %s.train with workdir %s", config.trainer, workdir)
      start = time.perf_counter()
      result = train(config, workdir)
      timings.append(
        dict(
          stage=str(config.trainer),
          workdir=workdir,
          seconds=round(time.perf_counter() - start, 2),
          reused=False,
        )
      )
      if top:
        _report_timings(timings, workdir)
      return result
    except errors.Error as error:
      # The innermost stage is the one at fault (an upstream stage trained on demand).
      if getattr(error, "stage", None) is None:
        error.stage = workdir
      raise


# ------------------------------------------------------------------------------------------------
# The stage graph.
# ------------------------------------------------------------------------------------------------


def upstream_stages(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """The upstream stages `config` trains before its own: (section, init field) pairs.

  A trainer declares each upstream stage in its CONFIG_SPEC as a `config_spec.Stage` field
  (the stage's whole config, e.g. `sft`) with `unless=` the field that names a finished
  stage instead (e.g. `policy_init`). A stage is trained when that field is empty and the
  Stage's `when` condition holds; the order is the spec's (SFT before the reward model).
  """
  from rlhf_jax import config_spec as cs  # imported late: config_spec imports this module

  spec = trainer_spec(config.get("trainer"))
  out = []
  for name, check in spec.fields.items() if spec is not None else ():
    if not isinstance(check, cs.Stage) or check.unless is None or config.get(check.unless):
      continue
    if check.when is None or check.when(config):
      out.append((name, check.unless))
  return out


def resolve_upstream(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  timings: list[dict[str, Any]] | None = None,
) -> ml_collections.ConfigDict:
  """`config` with every upstream stage it needs finished: found, or trained, in the graph.

  Each stage in `upstream_stages` lives in `<workdir>/<section>`: reused when it holds a
  finished stage, else trained there by `run` (which resolves that stage's own upstream
  stages the same way). Stages resolved earlier are handed down: an empty init field of a
  later stage's config that names an earlier one is filled in, so the reward model of a
  PPO run is trained on that run's SFT policy. Returns a copy with the init fields set to
  the finished stages' workdirs (the trainer only loads them); `config` is unchanged, and
  so is the `config.json` written from it. `timings` collects each stage's wall time.
  """
  from rlhf_jax import stages  # imported late: stages needs JAX and the models

  resolved: dict[str, str] = {}
  for section, init_field in upstream_stages(config):
    stage_dir = os.path.join(workdir, section)
    if not stages.is_complete(stage_dir):
      child = ml_collections.ConfigDict(config[section].to_dict())
      for field, value in resolved.items():
        if field in child and not child[field]:
          child[field] = value
      logging.info("Training the upstream stage %s into %s", section, stage_dir)
      run(child, stage_dir, timings=timings)
    elif timings is not None:
      timings.append(dict(stage=section, workdir=stage_dir, seconds=0.0, reused=True))
    resolved[init_field] = stage_dir
  if not resolved:
    return config
  out = ml_collections.ConfigDict(config.to_dict())
  out.update(resolved)
  return out


def require_stage(config: Any, field: str) -> str:
  """The finished stage `config.<field>` names; a StageError when it is empty.

  Trainers load their upstream stages and never train them: `run` (and so the launcher)
  resolves the graph first. A trainer called directly needs the field set.
  """
  path = config.get(field)
  if not path:
    raise errors.StageError(
      f"config.{field} is empty: this trainer needs a finished stage there.",
      hint="Run the config through experiments.launch or rlhf_jax.config_utils.run, which "
      "train the upstream stages first, or set it to a finished stage's workdir.",
    )
  return path
