"""The `avsync` command: LightningCLI for training runs, plain subcommands for the tools around them.

avsync fit --config configs/pretrain/tiny_cpu.yaml      # also validate | test | predict
avsync prepare VIDEOS OUT ...                            # raw videos -> WebDataset shards
avsync synth OUT --clips N --classes K                   # synthetic audio-visual clips
avsync demo                                              # the end-to-end CPU demo
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from pathlib import Path

#: Lightning subcommands, run through LightningCLI (configs in `configs/`).
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")

#: Other subcommands: name -> ("module:function", one-line help). Each function takes its argv.
TOOLS: dict[str, tuple[str, str]] = {
    "prepare": ("avsync.data.prepare:main", "raw videos or a CAV-MAE datafile -> WebDataset shards"),
    "synth": ("avsync.synth:main", "synthetic audio-visual clips with ground truth"),
    "retrieve": ("avsync.tasks.retrieval:main", "zero-shot audio-visual retrieval (R@1/5/10, median rank)"),
    "localize": ("avsync.tasks.localization:main", "sound-prompted segmentation heat maps and metrics"),
    "segment": (
        "avsync.tasks.segmentation:main",
        "temporal segmentation of one video into audio-visual events",
    ),
    "embed": ("avsync.api:embed_main", "videos -> per-time-step embeddings (npz or parquet)"),
    "export": ("avsync.api:export_main", "a checkpoint -> backbone weights + config as safetensors"),
    "index": ("avsync.search.commands:main", "build / search a FAISS index of embedded clips"),
    "demo": ("avsync.demo:main", "synthesize, prepare, pretrain and evaluate the tiny model on CPU"),
    "config": ("avsync.recipes:main", "print a shipped recipe (`avsync config --list` names them)"),
    "app": ("avsync.app.ui:main", "a web page: where the sound is, what happens when, clips alike"),
}


#: Modules whose LightningModule / LightningDataModule subclasses `--model` and `--data` accept by their
#: short names (`--model PretrainModule`, `--model.help PretrainModule`) and list in `--help`.
REGISTERED_MODULES = (
    "avsync.tasks",
    "avsync.tasks.retrieval",
    "avsync.tasks.localization",
    "avsync.tasks.probe",
    "avsync.data.datamodule",
    "avsync.tasks.probe.data",
)


def register_classes() -> None:
    """Import the task and data modules: jsonargparse finds subclasses through `__subclasses__`, so only
    classes imported before the parser is built are known by name."""
    for module in REGISTERED_MODULES:
        importlib.import_module(module)


def backbone_setting(model, name: str):
    """`model.backbone.<name>` (through a frozen backbone's `.model`), else the model's own `<name>` (a
    module without a backbone, such as the image-MAE stage), or None when neither has it."""
    backbone = getattr(model, "backbone", None)
    backbone = getattr(backbone, "model", backbone)
    return getattr(backbone, name, getattr(model, name, None))


def avsync_cli_class():
    """LightningCLI where the config file and the command line alone configure a run.

    Lightning's CLI merges the hyper-parameters stored in a `--ckpt_path` FILE into the config (a stored
    `lr` replaced the config's, command-line overrides were dropped, and a stored `_class_path` was
    imported); here a checkpoint only restores state. Every subcommand reads it weights-only through
    `AtomicCheckpointIO`, which is also told what the file must hold for this run.
    """
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from avsync.config_checks import ConfigError, check_trainer
    from avsync.training import AtomicCheckpointIO

    class AVSyncCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            """The data module's input sizes come from the model's backbone, once both are built (a data
            module without these arguments, such as the probe's feature cache, is left as it is)."""
            for name in ("image_size", "audio_length"):
                parser.link_arguments(
                    "model",
                    f"data.init_args.{name}",
                    compute_fn=functools.partial(backbone_setting, name=name),
                    apply_on="instantiate",
                )

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            # no `--weights_only` option: a checkpoint is always read weights-only
            return {name: skip | {"weights_only"} for name, skip in LightningCLI.subcommands().items()}

        def _parse_ckpt_path(self) -> None:
            """Nothing: the checkpoint's hyper-parameters never override the config."""

        def _instantiate_trainer(self, config: dict, callbacks: list):
            """One model summary: the default `SummaryWithoutFlops` (in `trainer_defaults`, which LightningCLI
            appends to every run's callbacks) is dropped where the run configures a `ModelSummary` of its
            own (the demo's, a `RichModelSummary`) or turns the summary off; and as one is then in the
            callbacks, the Trainer is told not to look for it (it would say so in an info line)."""
            from lightning.pytorch.callbacks import ModelSummary

            from avsync.training.console import SummaryWithoutFlops
            from avsync.training.logs import keep_history

            given = config.get("callbacks")
            given = [] if given is None else given if isinstance(given, list) else [given]
            own = any(isinstance(callback, ModelSummary) for callback in [*given, *callbacks])
            off = config.get("enable_model_summary") is False or bool(config.get("barebones"))
            if own or off:
                defaults = self.trainer_defaults.get("callbacks") or []
                defaults = [c for c in defaults if not isinstance(c, SummaryWithoutFlops)]
                self.trainer_defaults = {**self.trainer_defaults, "callbacks": defaults}
            if not off:
                config["enable_model_summary"] = False  # a ModelSummary is among the callbacks
            config["logger"] = keep_history(config.get("logger"))  # resumes append to CSV logs
            try:
                return super()._instantiate_trainer(config, callbacks)
            except MisconfigurationException as error:  # Lightning's refusal of an option: one line
                raise ConfigError(f"trainer: {error}") from None

        def before_instantiate_classes(self) -> None:
            """Trainer options no run can use are refused before the model is built."""
            config = self.config[self.subcommand] if self.subcommand else self.config
            check_trainer(config.get("trainer"))

        def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
            kwargs = super()._prepare_subcommand_kwargs(subcommand)
            io = self.trainer.strategy.checkpoint_io
            if isinstance(io, AtomicCheckpointIO):
                io.expect(self.model, training_state=subcommand == "fit")
            if "weights_only" in inspect.signature(getattr(self.trainer, subcommand)).parameters:
                kwargs["weights_only"] = True  # explicit: torch's default and its env override play no part
            return kwargs

    return AVSyncCLI


def trainer_defaults() -> dict:
    """What every LightningCLI run's Trainer gets besides its config."""
    from avsync.data.skips import LogSkippedSamples
    from avsync.training import CheckpointOnSignal
    from avsync.training.console import SummaryWithoutFlops

    return {
        # a class path rather than an instance: the saved config.yaml can then show it
        "plugins": [{"class_path": "avsync.training.AtomicCheckpointIO"}],
        # always added, whatever the config's callbacks: stop on signals with a checkpoint, log skipped
        # samples (data/skipped_*, reasons, an end-of-run summary); and a model summary without
        # Lightning's "Total FLOPs: 0" unless the run has its own (`AVSyncCLI._instantiate_trainer`)
        "callbacks": [CheckpointOnSignal(), LogSkippedSamples(), SummaryWithoutFlops()],
    }


def relaunch_argv(program: list[str], argv: list[str]) -> list[str]:
    """`sys.argv` while LightningCLI runs `argv`. Lightning's launcher for `devices > 1` without torchrun
    starts each other rank by re-running `sys.argv`, so when this process is the `avsync` command it must
    read `avsync <argv>`; called from other programs (the demo, tests), only the program's name, so that
    LightningCLI sees no second command line (those need torchrun or `strategy: ddp_spawn` for many
    devices)."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    is_avsync = (spec is not None and spec.name == "avsync.cli") or (
        spec is None and Path(program[0]).name == "avsync"
    )
    return [program[0], *argv] if is_avsync else program[:1]


def lightning_cli(argv: list[str]):
    """Run LightningCLI on `argv` (`fit --config ...`); model and data are chosen by `class_path`.

    Every run writes checkpoints atomically and turns SIGTERM/SIGUSR1 into a checkpoint and a clean
    exit (`avsync.training`); a config's own `trainer.plugins` replace the default checkpoint writer.
    """
    from avsync.checkpoint_io import CheckpointError
    from avsync.config_checks import ConfigError
    from avsync.data.member_paths import UnsafeNameError
    from avsync.output_paths import OutputError
    from avsync.recipes import resolve_config_args

    register_classes()
    program = sys.argv
    sys.argv = relaunch_argv(program, argv)
    try:
        return avsync_cli_class()(
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=resolve_config_args(argv),  # `--config pretrain/tiny_cpu`: a recipe shipped in the package
            save_config_kwargs={"overwrite": True},
            trainer_defaults=trainer_defaults(),
        )
    except Exception as error:  # a bad --ckpt_path, backbone_checkpoint, shard manifest or setting: one line
        cause = _input_error_behind(error, (CheckpointError, UnsafeNameError, ConfigError, OutputError))
        if cause is None:
            raise
        print(f"avsync {argv[0]}: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        sys.argv = program


def _input_error_behind(error: BaseException, kinds: tuple[type[Exception], ...]) -> BaseException | None:
    """`error` itself or the error of `kinds` it was raised from: jsonargparse reports a module that
    could not be built (its `backbone_checkpoint` unreadable) as a ValueError about Union subtypes whose
    cause is the module's own error."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kinds):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


#: The tools' argparse parsers, in a module that imports no torch (`tool -> module:fn`); `demo` builds its
#: own, in a module that is quick to import.
LIGHT_PARSERS: dict[str, str] = {
    "retrieve": "avsync.tool_parsers:retrieve",
    "localize": "avsync.tool_parsers:localize",
    "segment": "avsync.tool_parsers:segment",
    "prepare": "avsync.tool_parsers:prepare",
    "synth": "avsync.tool_parsers:synth",
    "embed": "avsync.tool_parsers:embed",
    "export": "avsync.tool_parsers:export",
    "index": "avsync.tool_parsers:index",
    "config": "avsync.tool_parsers:config",
    "app": "avsync.tool_parsers:app",
}


def quiet_dependency_warnings() -> None:
    """A tool prints its results and its own warnings: deprecation notices of its dependencies are for
    their developers, not for the user (`-W` or PYTHONWARNINGS still decide when given)."""
    import warnings

    if sys.warnoptions:
        return
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)


def _is_input_error(error: BaseException) -> bool:
    """Bad user input (an unreadable checkpoint or video): reported in one line. The classes are looked up
    only when something failed, so that a tool's start does not pay for importing torch here."""
    from avsync.checkpoint_io import CheckpointError
    from avsync.config_checks import ConfigError
    from avsync.data.errors import DecodeError
    from avsync.data.member_paths import UnsafeNameError
    from avsync.output_paths import OutputError

    return isinstance(error, (CheckpointError, ConfigError, DecodeError, UnsafeNameError, OutputError))


def usage() -> str:
    lines = ["usage: avsync COMMAND [ARGS]", "", "training (LightningCLI; see `avsync fit --help`):"]
    lines += [
        f"  {name:<10} {name} with a config: avsync {name} --config FILE.yaml" for name in TRAINER_COMMANDS
    ]
    lines += ["", "tools:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in TOOLS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in TRAINER_COMMANDS:
        from avsync.distributed import release_process_group

        lightning_cli(argv)
        release_process_group()
        return 0
    if command in TOOLS:
        if command in LIGHT_PARSERS:  # help and usage errors before torch is imported (seconds)
            parser_module, parser_function = LIGHT_PARSERS[command].split(":")
            getattr(importlib.import_module(parser_module), parser_function)().parse_args(rest)
        quiet_dependency_warnings()
        module_name, function_name = TOOLS[command][0].split(":")
        try:
            return int(getattr(importlib.import_module(module_name), function_name)(rest) or 0)
        except Exception as error:
            if not _is_input_error(error):
                raise
            print(f"avsync {command}: error: {error}", file=sys.stderr)  # one line, no traceback
            return 2
    print(f"avsync: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
