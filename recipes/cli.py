"""The LightningCLI of the collection (``python -m recipes fit|validate|test``), the recipe lookup by name and
``list``. The command table is ``recipes/__main__.py``."""

from __future__ import annotations

import re
import shlex
import sys
import traceback
import warnings
from pathlib import Path

import lightning as L
import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.run.atomic_checkpoint import AtomicCheckpointIO
from callbacks.run.empty_fit import EmptyFitGuard
from callbacks.run.exact_resume import ExactResume
from callbacks.run.finite_loss import FiniteLossGuard
from callbacks.run.periodic_checkpoint import PeriodicLastCheckpoint
from callbacks.run.preemption import Preempted, PreemptionCheckpoint, release_process_group
from callbacks.run.progress import StepProgressBar
from callbacks.run.resume_settings import OptimizerSettingsOnResume
from callbacks.run.run_info import RunInfoLogger
from callbacks.run.throughput import ThroughputLogger
from callbacks.run.train_mode import TrainModeCheck
from recipes import resume
from recipes.checkpoints import import_class
from recipes.commands.checks import CommandError
from recipes.parts.loggers import check_log_dir, default_loggers, eval_loggers, remove_unused_run_dir

CONFIG_DIR = Path(__file__).parent / "configs"


class RunConfigSaver(SaveConfigCallback):
    """Saves ``config.yaml`` into the run's own directory and sends the same config to W&B, with each callback's
    settings also under ``callbacks.<name>`` (:func:`callback_settings`), so runs filter by ``callbacks.lisa.n_layers``
    (inside the ``trainer.callbacks`` list they cannot). It also keeps the config in every checkpoint (its callback
    state), where the resume rule (:mod:`recipes.resume_rule`) compares it."""

    def state_dict(self) -> dict[str, str]:
        return {"config": self.parser.dump(self.config, skip_none=False)}

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                nested = yaml.safe_load(self.parser.dump(self.config, skip_unset=False))  # filterable keys
                subcommand = nested.get(nested.get("subcommand")) if "subcommand" in nested else nested
                nested["callbacks"] = callback_settings(((subcommand or {}).get("trainer") or {}).get("callbacks"))
                logger.experiment.config.update(nested, allow_val_change=True)


def callback_settings(callbacks: list | dict | None) -> dict[str, dict]:
    """The ``trainer.callbacks`` entries of a config (``class_path`` + ``init_args``) as ``{name: init_args}``; the
    name is the callback's dashboard prefix (``lisa``, ``owlore``, ``badam``, ``pld``) or its class name in snake
    case (``layer_diagnostics``), numbered when a class appears twice."""
    out: dict[str, dict] = {}
    for entry in callbacks if isinstance(callbacks, list) else [callbacks] if callbacks else []:
        if not isinstance(entry, dict) or "class_path" not in entry:
            continue
        try:
            prefix = getattr(import_class(entry["class_path"]), "log_prefix", None)
        except ImportError:
            prefix = None
        name = prefix or re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", entry["class_path"].rsplit(".", 1)[-1]).lower()
        key, n = name, 2
        while key in out:
            key, n = f"{name}_{n}", n + 1
        out[key] = dict(entry.get("init_args") or {})
    return out


class RecipesCLI(LightningCLI):
    """LightningCLI in subclass mode, with the collection's loggers unless the config names its own.

    Every run also gets :class:`RunInfoLogger` (seed and library versions), :class:`FiniteLossGuard` (stop at the
    first NaN/inf loss), :class:`ExactResume` (global random states restored on resume; the data modules'
    resumable sampler restores the batch position), Lightning's ``LearningRateMonitor`` (``optim/lr/<group>``
    every logged step) and :class:`StepProgressBar`, and its log directory is checked for write access and free
    space before training. Interruptions (docs/interruptions.md): checkpoints are written atomically
    (:class:`AtomicCheckpointIO`), ``last.ckpt`` is saved periodically (:class:`PeriodicLastCheckpoint`) and on
    SIGTERM/SIGUSR1/SIGINT (:class:`PreemptionCheckpoint`), a fit that gets no batch is an error
    (:class:`EmptyFitGuard`), trainable modules in eval mode at the start of training stop the run
    (:class:`TrainModeCheck`), and ``--ckpt_path last|auto`` resumes in the same run folder under the rule of
    :mod:`recipes.resume`.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 42)
        # a misspelled option must be an error, not silently read as an abbreviation of a longer one
        kwargs.setdefault("parser_kwargs", {"allow_abbrev": False})  # subcommand parsers inherit it
        kwargs.setdefault("trainer_defaults", {"callbacks": [RunInfoLogger(), FiniteLossGuard(), ExactResume(),
                                                             LearningRateMonitor(logging_interval="step"),
                                                             StepProgressBar(), EmptyFitGuard(),
                                                             PreemptionCheckpoint(), OptimizerSettingsOnResume(),
                                                             TrainModeCheck(), ThroughputLogger()]})
        super().__init__(L.LightningModule, L.LightningDataModule, *args, subclass_mode_model=True,
                         subclass_mode_data=True, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--wandb", type=str, default="offline", choices=["offline", "online", "disabled"],
                            help="W&B mode: offline (default, no account needed), online, or disabled")
        parser.add_argument("--wandb_project", type=str, default="layerwise-recipes", help="W&B project name")
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="run name for the log directory (default: the config file's name)")
        parser.add_argument("--eval_root", type=str | None, default=None,
                            help="validate/test of a checkpoint file: write the results under "
                                 "<eval_root>/<run>/<version>/eval/ (default: beside the checkpoint's run, or "
                                 "under trainer.default_root_dir when that folder is read-only)")
        parser.add_argument("--min_free_mb", type=int, default=100,
                            help="refuse to start when the log directory's disk has less free space than this")
        parser.add_argument("--last_ckpt_every_minutes", type=float | None, default=15.0,
                            help="save last.ckpt at least this often during fit (0/null: no time trigger)")
        parser.add_argument("--last_ckpt_every_steps", type=int | None, default=1000,
                            help="save last.ckpt at least every this many optimizer steps (0/null: no step trigger)")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse ``args``, or the process's command line when ``None``. Given ``args`` are the whole command line
        (``python -m recipes`` passes them resolved, and the demo its own): unlike Lightning's version, this one does
        not look at ``sys.argv`` to warn that both were given."""
        self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)

    # Overrides a private LightningCLI method (Lightning 2.6: ``_parse_ckpt_path(self) -> None``, called by
    # ``__init__`` right after parsing): Lightning's version opens the checkpoint itself and lets its
    # hyper-parameters silently override the config; ours applies the resume rule of recipes.resume, which reads the
    # checkpoint through recipes.checkpoints. tests/test_cli.py fails if Lightning renames it or stops calling it.
    def _parse_ckpt_path(self) -> None:
        """Resolves ``--ckpt_path last|auto`` and applies the resume rule of :mod:`recipes.resume`."""
        self.resume_plan = resume.ResumePlan(None)
        sub = self.config.get("subcommand")
        if sub and "ckpt_path" in self.config[sub]:
            self.resume_plan = resume.plan(self.config[sub], sub, self._run_name(self.config[sub]))
            self.config[sub]["ckpt_path"] = self.resume_plan.path
            if self.resume_plan.path and self.config[sub].get("weights_only", False) is None:
                # our checkpoints hold hyper-parameter objects (not weights only), and recipes.checkpoints has
                # already read this one: said here, so Lightning does not print that it was not set
                self.config[sub]["weights_only"] = False
            for note in self.resume_plan.notes:
                rank_zero_info(note)
            if self.resume_plan.version:  # continuing in its own folder, which of course holds checkpoints
                warnings.filterwarnings("ignore", r"Checkpoint directory .* exists and is not empty")

    def instantiate_classes(self) -> None:
        """Build the configured classes; a class's own argument error comes out as itself (its type and message
        last on the screen), not wrapped in jsonargparse's dump of every type the value was tried against."""
        try:
            super().instantiate_classes()
        except Exception as err:
            cause = argument_error(err)
            if cause is err:
                raise
            print(f"Error in the run's configuration: {type(cause).__name__}: {cause}\n", file=sys.stderr)
            raise cause from None

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """The Trainer, after the run's own steps: check the log directory, mark an untrained evaluation, give the
        collection's loggers, drop default callbacks that cannot work, add atomic checkpoint writes and (fit) the
        periodic ``last.ckpt``."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config["trainer"].get("default_root_dir") or "runs"
        check_log_dir(root, config["min_free_mb"])
        name = self._run_name(config) + self._note_untrained(config)
        if config["trainer"].get("logger") in (None, True):  # the config names no loggers of its own
            kwargs["logger"] = self._default_loggers(config, root, name)
        self._drop_unusable_default_callbacks(config)
        plugins = self._plugins_with_atomic_checkpoint()
        if plugins is not None:
            kwargs["plugins"] = plugins
        if self.subcommand in ("fit", None):  # None: run=False, as the demo fits
            self._add_periodic_checkpoint(config)
        return super().instantiate_trainer(**kwargs)

    def _note_untrained(self, config) -> str:
        """Warn about ``validate``/``test`` of a model with no trained weights; the run name's suffix for it."""
        self.untrained = resume.untrained_note(config) if self.subcommand in ("validate", "test") else None
        if not self.untrained:
            return ""
        rank_zero_warn(self.untrained)
        return "-untrained"

    def _default_loggers(self, config, root: str, name: str) -> list:
        """CSV (+ W&B) loggers: beside the training run when evaluating a checkpoint file (or under ``--eval_root``,
        or ``<root>`` when the run is read-only), else in ``<root>/<name>/version_N`` (the resumed version, or a new
        one this run claims)."""
        ckpt = config.get("ckpt_path")
        if self.subcommand in ("validate", "test") and ckpt and Path(ckpt).is_file():  # beside the training run
            loggers = eval_loggers(ckpt, self.subcommand, config["wandb"], config["wandb_project"],
                                   config["eval_root"], root)
            # the restored ModelCheckpoint state names the training run's folder; evaluation saves nothing
            warnings.filterwarnings("ignore", "The dirpath has changed from", UserWarning)
        else:
            loggers = default_loggers(root, name, config["wandb"], config["wandb_project"],
                                      version=self.resume_plan.version)
        if self.resume_plan.version is None:
            self.own_run_dir = loggers[0].log_dir  # claimed for this run: removed again if it fails to start
        return loggers

    def _drop_unusable_default_callbacks(self, config) -> None:
        """No ``LearningRateMonitor`` or :class:`ThroughputLogger` without a logger, nor the default
        ``ThroughputLogger`` when the config gives its own (its ``window_size``); no :class:`StepProgressBar` when
        the config gives its own progress bar or turns the bar off."""
        given = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        own_bar = any(isinstance(c, ProgressBar) for c in given)
        no_logger = config["trainer"].get("logger") is False
        unused = (LearningRateMonitor, ThroughputLogger) if no_logger else ()  # nothing to log to
        unused += (ThroughputLogger,) if any(isinstance(c, ThroughputLogger) for c in given) else ()
        unused += (StepProgressBar,) if own_bar or config["trainer"].get("enable_progress_bar") is False else ()
        defaults = self.trainer_defaults
        defaults["callbacks"] = [c for c in defaults["callbacks"] if not isinstance(c, unused)]

    def _plugins_with_atomic_checkpoint(self) -> list | None:
        """The configured plugins plus :class:`AtomicCheckpointIO`, or ``None`` when they hold a ``CheckpointIO``."""
        plugins = self._get(self.config_init, "trainer").get("plugins")
        plugins = [] if plugins is None else plugins if isinstance(plugins, list) else [plugins]
        if any(isinstance(p, CheckpointIO) for p in plugins):
            return None
        return [*plugins, AtomicCheckpointIO()]

    def _add_periodic_checkpoint(self, config) -> None:
        """Add :class:`PeriodicLastCheckpoint` (``last.ckpt`` every so many minutes and steps) to the callbacks."""
        periodic = PeriodicLastCheckpoint(config["last_ckpt_every_minutes"], config["last_ckpt_every_steps"])
        self.trainer_defaults = {**self.trainer_defaults,
                                 "callbacks": [*self.trainer_defaults.get("callbacks", []), periodic]}

    # Overrides a private LightningCLI method (Lightning 2.6: ``_run_subcommand(self, subcommand: str) -> None``,
    # called by ``__init__`` to run fit/validate/test): the only place around the run itself where a run that fails
    # to start can remove the log folder it claimed. tests/test_cli.py fails if Lightning renames it or stops
    # calling it.
    def _run_subcommand(self, subcommand: str) -> None:
        """Run ``subcommand``; when it fails before a training step (any failure of validate/test), remove the
        run folder this run claimed."""
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            own = getattr(self, "own_run_dir", None)
            if own and (self.trainer.global_step == 0 or subcommand != "fit"):  # a failed start leaves no folder
                remove_unused_run_dir(own, self.trainer.loggers)
            raise

    @staticmethod
    def _run_name(config) -> str:
        if config.get("run_name"):
            return config["run_name"]
        paths = config.get("config") or []
        return Path(str(paths[-1])).stem if paths else "run"


def argument_error(err: BaseException) -> BaseException:
    """The first exception in ``err``'s chain of causes that was raised outside jsonargparse (by a class)."""
    current: BaseException | None = err
    while current is not None:
        frames = traceback.extract_tb(current.__traceback__)
        if frames and "jsonargparse" not in Path(frames[-1].filename).parts:
            return current
        current = current.__cause__
    return err


def recipe_summaries() -> dict[str, str]:
    """Each recipe YAML's name and its first comment line."""
    out = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.read_text() else ""
        out[path.stem] = first.lstrip("# ").strip()
    return out


class ConfigNotFound(SystemExit):
    """A ``--config`` value that names no file and no packaged recipe (exits with status 2 and the message)."""


def resolve_config(value: str, option: str = "--config") -> str:
    """A ``--config`` value: an existing file as given; a bare name (no folder, e.g. ``lisa_sft`` or
    ``lisa_sft.yaml``) that is not a file here, the packaged recipe of that name; anything else that does not
    exist is an error (:class:`ConfigNotFound`): a path with a folder in it is never replaced by a packaged recipe
    (``my_stf/sft.yaml`` must not silently run the packaged ``sft.yaml``)."""
    if Path(value).exists() or value.lstrip().startswith(("{", "[")):
        return value
    packaged = CONFIG_DIR / value
    bare = Path(value).name == value and value not in ("", ".", "..")
    for candidate in (packaged, packaged.with_name(packaged.name + ".yaml")) if bare else ():
        if candidate.is_file():
            return str(candidate)
    hint = ("a bare name looks in the packaged recipes: " + ", ".join(recipe_summaries())) if bare else \
        "a path with a folder in it must exist (only a bare name, e.g. 'sft', looks in the packaged recipes)"
    raise ConfigNotFound(f"error: {option} {value!r}: no such file; {hint}")


CONFIG_OPTIONS = ("--config", "-c")


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config NAME`` / ``--config=NAME`` / ``-c NAME`` / ``-c=NAME`` resolved by
    :func:`resolve_config` (``-c`` is LightningCLI's short form of ``--config``); the words after ``--`` are left
    alone."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg in CONFIG_OPTIONS and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1], arg)
        elif arg.startswith(tuple(f"{o}=" for o in CONFIG_OPTIONS)):
            option, _, value = arg.partition("=")
            out[i] = f"{option}={resolve_config(value, option)}"
    return out


def print_recipes(argv: list[str] | None = None) -> None:
    """``list``: each recipe with its summary, and where the YAMLs are (to run by name or copy); ``list`` takes no
    arguments (``argv``, the words after it, must be empty)."""
    if argv:
        raise CommandError(f"list takes no arguments, got {argv}; run a recipe with python -m recipes fit --config "
                           "<name>")
    summaries = recipe_summaries()
    width = max(map(len, summaries), default=0)
    for name, line in summaries.items():
        print(f"{name:<{width}}  {line}")
    print(f"\nThe YAMLs are in {CONFIG_DIR}")
    print("Run one by name or path: python -m recipes fit --config <name>  (or layerwise fit --config <name>);"
          " copy one from there to change it.")


def quiet_third_party_warnings() -> None:
    """Hide deprecation notices raised inside libraries we depend on, about calls we do not make ourselves."""
    # Lightning's own pytree helper builds torch's LeafSpec, which recent torch releases deprecate
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    # peft's LoRA wrapper asks transformers 5 for `is_gradient_checkpointing`, which transformers 5 deprecates
    warnings.filterwarnings("ignore", r"`is_gradient_checkpointing` is deprecated", FutureWarning)
    # LightningCLI calls jsonargparse APIs that jsonargparse 4.49 deprecates (shown only when -W asks for them)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"lightning\.pytorch\.cli")
    # GRPO optimizes manually; Lightning then warns that a step-interval checkpoint holds the weights after the
    # step, which is the state a GRPO run resumes from (its next rollout samples from the updated policy)
    warnings.filterwarnings("ignore", r"Using ModelCheckpoint with manual optimization", UserWarning)


def run_lightning(subcommand: str | None, argv: list[str]) -> None:
    """``fit``/``validate``/``test`` (``subcommand``) with the arguments after it, through :class:`RecipesCLI`;
    with no subcommand, ``argv`` is all LightningCLI gets (``--help``, or an unknown command it reports). A
    preempted run prints the command that resumes it."""
    args = [subcommand, *argv] if subcommand else list(argv)
    try:
        cli = RecipesCLI(args=args)
    except Preempted as err:
        if rank_zero_only.rank == 0 and err.path is None:  # stopped before training: nothing new to resume from
            print(f"Start it again with the same command:\n  {shlex.join(['python', '-m', 'recipes', *args])}",
                  file=sys.stderr, flush=True)
        elif rank_zero_only.rank == 0:
            print(f"Resume with:\n  {resume.resume_command(args, err.path)}\n"
                  "(or --ckpt_path auto, which picks the newest checkpoint of this run)", file=sys.stderr, flush=True)
        raise
    except SIGTERMException:  # Lightning's own SIGTERM stop (outside training) exits 0; a killed run must not
        sys.exit(143)
    release_process_group()  # every rank ended the run together: the group goes before the interpreter does
    if getattr(cli, "untrained", None):
        rank_zero_warn(cli.untrained)
