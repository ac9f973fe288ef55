"""Two nodes of one process each, on loopback, launched the way the README launches a cluster run:
torchrun (`python -m torch.distributed.run`) with a c10d rendezvous, running `-m avsync.cli fit`,
gloo on the CPU, over shards prepared by `avsync prepare`. Each node has its own working directory,
as separate machines would."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from .conftest import avsync_env, checkpoints_dir, fit_config, free_port, shard_keys
from .reliability_probes import read_steps

BATCH, POISONED_STEP, SIGNALLED_AFTER = 2, 2, 3  # per-rank batch; NaN frames on rank 1 at step 2; SIGTERM


def test_two_nodes_split_shards_share_negatives_agree_on_skips_and_stops_and_save_once(
    prepared_shards, tmp_path, reliability
):
    config = fit_config(
        tmp_path / "fit.yaml",
        prepared_shards,
        Path("runs"),  # relative: each node writes under its own working directory
        steps_dir=tmp_path / "steps",
        trainer={"num_nodes": 2, "strategy": "ddp", "max_steps": 1000, "max_epochs": 100},  # until stopped
        data={"batch_size": BATCH, "resampled": False},  # fixed mode: every shard read by one rank
        probe={"poison_rank": 1, "poison_step": POISONED_STEP - 1},
        model={"warmup_steps": 2},  # fixed mode: an epoch has no length to count a warm-up in epochs
    )
    port = free_port()
    nodes, workdirs = [], []
    for node in (0, 1):
        workdirs.append(tmp_path / f"node{node}")
        workdirs[-1].mkdir()
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "reliability",
            "-m", "avsync.cli", "fit", "--config", str(config),
        ]  # fmt: skip
        log = open(workdirs[-1] / "torchrun.log", "w")
        nodes.append(subprocess.Popen(command, cwd=workdirs[-1], env=avsync_env(), stdout=log, stderr=log))

    # Once both ranks are past step SIGNALLED_AFTER, SIGTERM the torchrun of the node without rank 0,
    # as a scheduler would; torchrun forwards it to its worker.
    files = [tmp_path / "steps" / f"steps-rank{rank}.jsonl" for rank in (0, 1)]
    deadline = time.monotonic() + 150
    while all(node.poll() is None for node in nodes) and time.monotonic() < deadline:
        if all(f.exists() and f.read_text().count("\n") >= 1 + SIGNALLED_AFTER for f in files):
            rank1_dir = Path(json.loads(files[1].read_text().splitlines()[0])["cwd"])
            nodes[workdirs.index(rank1_dir)].send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    for node in nodes:
        node.wait(timeout=120)
    logs = [(workdir / "torchrun.log").read_text() for workdir in workdirs]

    steps = read_steps(tmp_path / "steps")
    assert sorted(steps) == [0, 1], logs
    assert {r["environment"] for records in steps.values() for r in records} == {"TorchElasticEnvironment"}
    assert {r["world"] for records in steps.values() for r in records} == {2}

    # Ranks read disjoint shards: every clip a rank saw comes from shards no other rank touched.
    owner_shards = shard_keys(prepared_shards)
    owner = {key: shard for shard, keys in owner_shards.items() for key in keys}
    first_epoch = {rank: [r for r in records if r["epoch"] == 0] for rank, records in steps.items()}
    seen = {rank: [key for r in records for key in r["keys"]] for rank, records in first_epoch.items()}
    shards = {rank: {owner[key] for key in keys} for rank, keys in seen.items()}
    assert all(len(keys) == len(set(keys)) >= BATCH * SIGNALLED_AFTER for keys in seen.values())
    assert not shards[0] & shards[1], shards
    reliability.record(
        "Multi-node",
        "2 nodes x 1 process: launch and data split",
        "torchrun --rdzv_backend c10d -m avsync.cli fit (gloo, loopback)",
        f"Lightning uses TorchElasticEnvironment (world size 2); the {len(owner_shards)} shards are split "
        "between the ranks, no shard read by both",
    )

    # Contrastive negatives span the global batch: the model's InfoNCE equals the one recomputed over
    # both ranks' clips, not the one over this rank's clips alone.
    for records in steps.values():
        for record in (records[0], records[2]):
            check = record["contrastive"]
            assert check["negatives"] == 2 * BATCH
            assert math.isclose(check["model"], check["global_batch"], rel_tol=1e-5)
            assert abs(check["model"] - check["local_batch"]) > 1e-3
    reliability.record(
        "Multi-node",
        "contrastive negatives",
        "InfoNCE inside the same run, recomputed by a forward hook",
        f"each clip is scored against all {2 * BATCH} clips of the global batch (2 ranks x {BATCH}), "
        "equal to a single-device loss over that batch",
    )

    # A NaN loss on rank 1 only: both ranks skip the step (rank 0 too, though its own loss is finite),
    # nothing hangs, the weights stay finite and training goes on.
    poisoned = {rank: records[POISONED_STEP - 1] for rank, records in steps.items()}
    assert math.isnan(poisoned[1]["loss"]) and math.isfinite(poisoned[0]["loss"])
    assert not poisoned[0]["weights_changed"] and not poisoned[1]["weights_changed"]
    after = [records[POISONED_STEP] for records in steps.values()]
    assert all(r["weights_changed"] and math.isfinite(r["loss"]) for r in after)
    reliability.record(
        "Multi-node",
        "non-finite loss on one rank only",
        "avsync fit under torchrun, NaN frames fed to rank 1 at one step",
        "every rank skips that step (weights unchanged on both, no DDP hang); the next step trains normally",
    )

    # SIGTERM reached rank 1 only; both ranks stopped after the same step, rank 0 saved last.ckpt into
    # its own working directory, and that is the only checkpoint file anywhere.
    stopped = {rank: records[-1]["step"] for rank, records in steps.items()}
    assert stopped[0] == stopped[1] >= SIGNALLED_AFTER, stopped
    last = checkpoints_dir(Path("runs")) / "last.ckpt"
    rank0_dir, rank1_dir = (Path(steps[rank][0]["cwd"]) for rank in (0, 1))
    rank0_log = logs[workdirs.index(rank0_dir)]
    assert f"SIGTERM received: stopped after step {stopped[0]}; checkpoint saved to {last}" in rank0_log
    written = sorted(path for path in tmp_path.rglob("*.ckpt*") if path.is_file())
    assert written == [rank0_dir / last], written
    assert torch.load(written[0], weights_only=True)["global_step"] == stopped[0]
    reliability.record(
        "Multi-node",
        "SIGTERM to one node",
        "kill -TERM to the torchrun of the node without rank 0 (it forwards the signal to its worker)",
        "both ranks stop after the same step (the signal is all-reduced every 10 steps); rank 0 writes "
        "last.ckpt and says so; no hang",
    )
    reliability.record(
        "Multi-node",
        "checkpointing under DDP",
        "ModelCheckpoint(save_last) and the SIGTERM checkpoint in the same run",
        "exactly one file (last.ckpt), written by rank 0 into its working directory; no partial files left",
    )
