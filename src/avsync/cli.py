"""The `avsync` command: LightningCLI for training runs, plain subcommands for the tools around them.

avsync fit --config configs/pretrain/tiny_cpu.yaml      # also validate | test | predict
avsync prepare VIDEOS OUT ...                            # raw videos -> WebDataset shards
avsync synth OUT --clips N --classes K                   # synthetic audio-visual clips
avsync demo                                              # the end-to-end CPU demo
"""

from __future__ import annotations

import importlib
import sys

#: Lightning subcommands, run through LightningCLI (configs in `configs/`).
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")

#: Other subcommands: name -> ("module:function", one-line help). Each function takes its argv.
TOOLS: dict[str, tuple[str, str]] = {
    "prepare": ("avsync.data.prepare:main", "raw videos or a CAV-MAE datafile -> WebDataset shards"),
    "synth": ("avsync.data.synth:main", "synthetic audio-visual clips with ground truth"),
    "retrieve": ("avsync.tasks.retrieval:main", "zero-shot audio-visual retrieval (R@1/5/10, median rank)"),
    "localize": ("avsync.tasks.localization:main", "sound-prompted segmentation heat maps and metrics"),
    "segment": (
        "avsync.tasks.segmentation:main",
        "temporal segmentation of one video into audio-visual events",
    ),
    "embed": ("avsync.api:embed_main", "videos -> per-time-step embeddings (npz or parquet)"),
    "export": ("avsync.api:export_main", "a checkpoint -> backbone weights + config as safetensors"),
    "demo": ("avsync.demo:main", "synthesize, prepare, pretrain and evaluate the tiny model on CPU"),
}


def lightning_cli(argv: list[str]):
    """Run LightningCLI on `argv` (`fit --config ...`); model and data are chosen by `class_path`.

    Every run writes checkpoints atomically and turns SIGTERM/SIGUSR1 into a checkpoint and a clean
    exit (`avsync.training`); a config's own `trainer.plugins` replace the default checkpoint writer.
    """
    from lightning.pytorch.cli import LightningCLI

    from avsync.training import CheckpointOnSignal

    program = sys.argv
    sys.argv = program[:1]  # `argv` is the whole command line; LightningCLI must not see a second one
    try:
        return LightningCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=argv,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                # a class path rather than an instance: the saved config.yaml can then show it
                "plugins": [{"class_path": "avsync.training.AtomicCheckpointIO"}],
                "callbacks": [CheckpointOnSignal()],  # always added, whatever the config's callbacks
            },
        )
    finally:
        sys.argv = program


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
        from avsync.checkpoint_io import CheckpointError
        from avsync.data.errors import DecodeError

        module_name, function_name = TOOLS[command][0].split(":")
        try:
            return int(getattr(importlib.import_module(module_name), function_name)(rest) or 0)
        except (CheckpointError, DecodeError) as error:  # bad user input: one line, no traceback
            print(f"avsync {command}: error: {error}", file=sys.stderr)
            return 2
    print(f"avsync: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
