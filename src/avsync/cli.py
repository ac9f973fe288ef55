"""The `avsync` command: LightningCLI for training runs, plain subcommands for the tools around them.

avsync fit --config configs/pretrain/tiny_cpu.yaml      # also validate | test | predict
avsync prepare VIDEOS OUT ...                            # raw videos -> WebDataset shards
avsync synth OUT --clips N --classes K                   # synthetic audio-visual clips
avsync demo                                              # the end-to-end CPU demo

Each tool's options are one dataclass in `avsync.tools`, which builds its command line; the function it
names (`RUN`) receives them filled in.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from pathlib import Path

from avsync.tools import TOOLS, Retrieve, matching, parse

#: Lightning subcommands, run through LightningCLI (configs in `configs/`).
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")

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
    from avsync.training.kernels import KernelChoice

    return {
        # a class path rather than an instance: the saved config.yaml can then show it
        "plugins": [{"class_path": "avsync.training.AtomicCheckpointIO"}],
        # always added, whatever the config's callbacks: stop on signals with a checkpoint, log skipped
        # samples (data/skipped_*, reasons, an end-of-run summary); and a model summary without
        # Lightning's "Total FLOPs: 0" unless the run has its own (`AVSyncCLI._instantiate_trainer`);
        # and the CPU kernels measured fastest on this host (`avsync.kernels`, `AVSYNC_KERNELS`)
        "callbacks": [CheckpointOnSignal(), LogSkippedSamples(), SummaryWithoutFlops(), KernelChoice()],
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


def lightning_cli(argv: list[str], report_errors: bool = True):
    """Run LightningCLI on `argv` (`fit --config ...`); model and data are chosen by `class_path`.

    Every run writes checkpoints atomically and turns SIGTERM/SIGUSR1 into a checkpoint and a clean
    exit (`avsync.training`); a config's own `trainer.plugins` replace the default checkpoint writer.
    A bad input (checkpoint, shards, setting) is one line and exit status 2, or with `report_errors`
    False raised as its own error, for a short form (`avsync retrieve`) to report under its name.
    """
    from avsync.checkpoints import CheckpointError
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
        if not report_errors:
            raise cause from None
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


def run_retrieve(options: Retrieve) -> int:
    """`avsync retrieve --ckpt PATH --shards DIR`: retrieval over prepared shards, printed and saved.

    The options become a `retrieval_config` (`avsync.tasks.retrieval`), run by the same LightningCLI as
    `avsync test --config`: the short form lives here, beside it."""
    import json
    import tempfile

    import torch

    from avsync.distributed import release_process_group
    from avsync.output_paths import OutputError, check_output_file, check_output_folder
    from avsync.tasks.evaluation_trainer import quiet_lightning
    from avsync.tasks.retrieval import format_table, is_retrieval_config, retrieval_config

    if options.out:  # before the model is read and the shards embedded
        try:
            check_output_folder(options.out)
            check_output_file(  # LightningCLI saves the run's config there (provenance)
                Path(options.out) / "config.yaml",
                ours=is_retrieval_config,
                what="the saved config of an avsync retrieval run",
            )
        except OutputError as error:
            print(f"avsync retrieve: error: {error}", file=sys.stderr)
            return 2
    precision = options.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    with tempfile.TemporaryDirectory(prefix="avsync-retrieve-") as scratch:
        # alignment None: the data module takes the loaded model's (one read)
        config = retrieval_config(
            **matching(options, retrieval_config, precision=precision, root_dir=options.out or scratch)
        )
        quiet_lightning()  # the table below is the output, not Lightning's hardware banner
        cli = lightning_cli(["test", "--config", json.dumps(config)], report_errors=False)
        release_process_group()
    if cli.trainer.global_rank == 0:
        print(format_table(cli.model.results))
        if options.out:
            rankings = " and rankings/" if options.top_k else ""
            print(f"wrote {Path(options.out) / 'retrieval.json'}, retrieval.csv{rankings}")
    return 0


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
    from avsync.checkpoints import CheckpointError
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
        options = parse(command, rest)  # help and usage errors before torch is imported (seconds)
        quiet_dependency_warnings()
        module_name, function_name = options.RUN.split(":")
        try:
            return int(getattr(importlib.import_module(module_name), function_name)(options) or 0)
        except Exception as error:
            if not _is_input_error(error):
                raise
            print(f"avsync {command}: error: {error}", file=sys.stderr)  # one line, no traceback
            return 2
    print(f"avsync: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
