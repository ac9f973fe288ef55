"""`avsync app` responsiveness: what a person waits for after an upload, and after a map switch.

The page's wait after an upload is `analyze` (decode, encode 16 pairs, segment) plus the first map
set's overlay video and frame strip plus the segmentation figure. Measured on a 10-s synthetic clip
with the demo's tiny model (`configs/pretrain/tiny_cpu.yaml`'s backbone; speed does not depend on the
weights), median of `repeats` after one warm-up.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.harness import machine, peak_rss_mib, time_runs


def app_latency(repeats: int = 5, seconds: float = 10.0) -> dict:
    from avsync.app.analysis import MAP_KINDS
    from avsync.app.ui import AppConfig, AvsyncApp
    from avsync.checkpoints import save_backbone
    from avsync.model import CAVMAESync
    from avsync.recipes import find_recipe
    from avsync.synth import synthesize

    config = yaml.safe_load(find_recipe("pretrain/tiny_cpu").read_text())
    backbone_args = config["model"]["init_args"]["backbone"]["init_args"]
    with tempfile.TemporaryDirectory(prefix="avsync-bench-app-") as scratch:
        root = Path(scratch)
        synth = synthesize(root / "synth", clips=2, classes=3, duration=seconds, size=128, workers=0)
        clip, other = sorted((synth.out_dir / "videos").glob("*.mp4"))
        torch.manual_seed(0)
        checkpoint = save_backbone(CAVMAESync(**backbone_args).eval(), root / "tiny.safetensors")
        app = AvsyncApp(AppConfig(str(checkpoint), examples=(str(other),)))
        paper, surgery = list(MAP_KINDS)
        state = {}

        def upload() -> None:
            token, _ = app.analyse_file(clip)
            app.overlays(token, paper, False)
            app.segmentation_outputs(token)
            state["token"] = token

        parts: dict[str, list[float]] = {"analyse": [], "maps_video": [], "segments": []}

        def upload_in_parts() -> None:
            started = time.perf_counter()
            token, _ = app.analyse_file(clip)
            parts["analyse"].append(time.perf_counter() - started)
            started = time.perf_counter()
            app.overlays(token, paper, False)
            parts["maps_video"].append(time.perf_counter() - started)
            started = time.perf_counter()
            app.segmentation_outputs(token)
            parts["segments"].append(time.perf_counter() - started)
            state["token"] = token

        total = time_runs(upload, repeats)
        time_runs(upload_in_parts, repeats, warmup=0)
        switch_new = time_runs(lambda: app.overlays(state["token"], surgery, False), 1, warmup=0)
        switch_back = time_runs(lambda: app.overlays(state["token"], paper, False), 3, warmup=0)
        maps_computed = app.analyses[state["token"]].maps_computed
        app.close()
    return {
        "clip_seconds": seconds,
        "backbone": backbone_args,
        "upload_to_maps_and_segments": total.as_dict(),
        "parts_median_s": {name: round(sorted(v)[len(v) // 2], 4) for name, v in parts.items()},
        "switch_to_other_map_s": switch_new.as_dict(),
        "switch_back_s": switch_back.as_dict(),
        "map_sets_computed_for_five_switches": maps_computed,
        "target_s": 3.0,
        "threads": torch.get_num_threads(),
        "peak_rss_mib": peak_rss_mib(),
        "machine": machine(),
    }
