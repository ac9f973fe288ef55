"""`avsync app`: a Gradio page that shows a checkpoint's alignment on a person's own clip.

Three tabs over one analysis of the uploaded clip (`analysis.analyze`, computed once per upload):
where the sound is (the 16 frames at the paper's alignment, each prompted with its own audio window,
as a video with the sound), what happens when (temporal segmentation), and clips that sound alike
(an `avsync index` of embedded clips). Bad input becomes a message in the page; the server binds to
127.0.0.1 unless told otherwise, caps uploads and deletes them once analysed.
"""

from __future__ import annotations

import html
import logging
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from avsync.app.analysis import MAP_KINDS, ClipAnalysis, InputLimits, InputProblem, analyze
from avsync.app.render import frame_strip, heat_overlay, overlay_video
from avsync.tools import App

log = logging.getLogger(__name__)

SEARCH_DIRECTIONS = {"its sound → videos": "audio", "its frames → sounds": "video"}
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")
NO_INDEX = (
    "No index was given. Build one from prepared shards and start the app with it:\n\n"
    "```\navsync embed --shards SHARDS --ckpt CKPT --out EMBED\navsync index build EMBED INDEX\n"
    "avsync app --ckpt CKPT --index INDEX [--videos FOLDER_OF_THE_CLIPS]\n```\n"
    "(`make app` does this for the demo's held-out clips.)"
)


@dataclass
class AppConfig:
    """What `avsync app` serves. `examples`: clips offered in the page (also the control's sounds);
    `videos`: where gallery clips are found by id for previews; `keep`: analyses kept in memory."""

    checkpoint: str
    index: str | None = None
    videos: str | None = None
    examples: tuple[str, ...] = ()
    limits: InputLimits = InputLimits()
    device: str = "cpu"
    keep: int = 16


class AvsyncApp:
    """The model, the optional index and the analyses of this server (shared by all sessions)."""

    def __init__(self, config: AppConfig) -> None:
        from avsync.api import load

        self.config = config
        self.model = load(config.checkpoint, config.device)
        self.workdir = Path(tempfile.mkdtemp(prefix="avsync-app-"))
        self.analyses: OrderedDict[str, ClipAnalysis] = OrderedDict()
        self.rendered: dict[tuple, tuple[str, str]] = {}
        self.lock = threading.Lock()  # one forward pass at a time on these 2 cores
        self.examples = {Path(p).stem: Path(p) for p in config.examples}
        self.index, self.index_problem = self._open_index(config.index)

    # ------------------------------------------------------------------ index
    def _open_index(self, directory: str | None):
        if directory is None:
            return None, NO_INDEX
        from avsync.search.index import SearchError, SearchIndex

        try:
            index = SearchIndex(directory)
            recorded = index.facts.get("model", {}).get("weights_digest")
            if recorded is not None and recorded != self.model.weights_digest:
                return None, (
                    f"The index {directory} was embedded with another model (weights digest "
                    f"{recorded[:12]}…, this app's {self.model.weights_digest[:12]}…): its scores would not "
                    "compare. Give the app the checkpoint the index was built with."
                )
            return index, None
        except SearchError as error:
            return None, f"The index cannot be used: {error}"

    # ------------------------------------------------------------------ analyses
    def analyse_file(self, path: str | Path, name: str | None = None) -> tuple[str, ClipAnalysis]:
        with self.lock:
            analysis = analyze(self.model, path, self.config.limits, name)
        token = uuid.uuid4().hex
        self.analyses[token] = analysis
        while len(self.analyses) > self.config.keep:
            old, _ = self.analyses.popitem(last=False)
            for key in [k for k in self.rendered if k[0] == old]:
                for file in self.rendered.pop(key):
                    Path(file).unlink(missing_ok=True)
        return token, analysis

    def example_analysis(self, name: str) -> ClipAnalysis:
        """An example clip's analysis, kept for the server's life (the control's sounds come from them)."""
        key = f"example:{name}"
        if key not in self.analyses:
            with self.lock:
                self.analyses[key] = analyze(self.model, self.examples[name], self.config.limits, name)
        return self.analyses[key]

    def control_sound(self, analysis: ClipAnalysis) -> tuple[ClipAnalysis | None, str]:
        """Another clip whose sound prompts the control: the next example that is not this clip; without
        examples, this clip's own windows from half a clip away."""
        names = [name for name in self.examples if name != analysis.name]
        if not names:
            return None, "its own sound, shifted by half the clip (no other clip to borrow from)"
        return self.example_analysis(names[0]), f"the sound of {names[0]}"

    def overlays(self, token: str, kind: str, control: bool) -> tuple[str, str, str]:
        """(video path, strip path, caption) of one map setting; rendered once per setting."""
        key = (token, kind, control)
        analysis = self.analyses[token]
        caption = f"{kind}; each frame prompted with its own audio window"
        sound, prompts = analysis.sound, None
        if control:
            other, words = self.control_sound(analysis)
            if other is None:
                prompts = analysis.prompts.roll(len(analysis.prompts) // 2, dims=0)
            else:
                prompts, sound = other.prompts[: len(analysis.prompts)], other.sound
            caption = f"{kind}; control: each frame prompted with {words}"
        if key not in self.rendered:
            maps = analysis.maps(kind, prompts)
            frames = heat_overlay(analysis.frames, maps)
            stem = self.workdir / f"{token[:12]}-{list(MAP_KINDS).index(kind)}-{int(control)}"
            video = overlay_video(frames, analysis.frame_times, analysis.duration, sound, f"{stem}.webm")
            strip = frame_strip(frames, analysis.frame_times, columns=4)
            strip.save(f"{stem}.png")
            self.rendered[key] = (str(video), f"{stem}.png")
        return (*self.rendered[key], caption)

    def segmentation_outputs(self, token: str) -> tuple[str, str, list[list]]:
        from avsync.tasks.segmentation import ClipFeatures, plot_segmentation

        analysis = self.analyses[token]
        figure = self.workdir / f"{token[:12]}-segments.png"
        if not figure.exists():
            features = ClipFeatures(
                analysis.name, analysis.prompts.numpy(), analysis.global_video.numpy(),
                list(analysis.frames), analysis.fbank, analysis.duration,
            )  # fmt: skip
            plot_segmentation(features, analysis.segmentation, figure)
        result = analysis.segmentation
        counts = ", ".join(f"{kind.replace('_', '-')}: {count}" for kind, count in result.counts.items())
        labels = result.segments["audio_visual"]
        times = analysis.frame_times
        events = _events(labels, times, analysis.duration)
        kinds = result.counts["audio_visual"]
        text = (
            f"**{len(events)} audio-visual segments** of {kinds} kinds of event (the number of kinds chosen "
            f"by the silhouette score; per feature: {counts}): "
            + "; ".join(f"{a:.1f}–{b:.1f} s" for a, b in events)
            + ". Boundary score: 1 − cosine between consecutive frames' audio-visual features."
        )
        rows = [
            [round(times[t + 1], 2), round(score, 4), "yes" if labels[t + 1] != labels[t] else ""]
            for t, score in enumerate(analysis.boundary_scores)
        ]
        return str(figure), text, rows

    def search(self, token: str, direction: str) -> tuple[list[list], str]:
        if self.index is None:
            return [], self.index_problem or NO_INDEX
        from avsync.search.index import TARGET, SearchError

        analysis = self.analyses[token]
        modality = SEARCH_DIRECTIONS[direction]
        tokens = analysis.audio_tokens if modality == "audio" else analysis.video_tokens
        try:
            tokens = self.index.check_query(tokens, f"{analysis.name} ({modality} query)")
            (hits,) = self.index.search(tokens, modality, 10)
        except SearchError as error:
            return [], f"The search failed: {error}"
        rows = [[e["rank"], e["clip"], round(e["score"], 4)] for e in hits.to_json()]
        return rows, self._previews(rows, TARGET[modality])

    def _previews(self, rows: list[list], gallery: str) -> str:
        if self.config.videos is None:
            return f"<p>The {gallery} gallery's clips by id (start the app with --videos to play them)</p>"
        cells = []
        for rank, clip, score in rows:
            file = _find_video(Path(self.config.videos), clip)
            label = f"{rank}. {html.escape(clip)} ({score:.3f})"
            if file is None:
                cells.append(f"<div class='hit'><p>{label}<br>(file not found)</p></div>")
            else:
                cells.append(
                    f"<div class='hit'><video controls preload='metadata' width='200' "
                    f"src='/gradio_api/file={html.escape(str(file))}'></video><p>{label}</p></div>"
                )
        return "<div class='hits'>" + "".join(cells) + "</div>"

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _events(labels: list[int], times: list[float], duration: float) -> list[tuple[float, float]]:
    starts = [0] + [t for t in range(1, len(labels)) if labels[t] != labels[t - 1]]
    ends = [*[times[s] for s in starts[1:]], duration]
    return [(times[s], e) for s, e in zip(starts, ends, strict=True)]


def _find_video(folder: Path, clip: str) -> Path | None:
    for suffix in VIDEO_SUFFIXES:
        candidate = folder / f"{clip}{suffix}"
        if candidate.is_file() and candidate.resolve().parent == folder.resolve():
            return candidate
    return None


# ---------------------------------------------------------------------------------------------- page
def build_page(app: AvsyncApp):
    import gradio as gr

    kinds = list(MAP_KINDS)
    limits = app.config.limits
    with gr.Blocks(title="avsync", delete_cache=(60, 600)) as page:
        gr.Markdown(
            "# avsync: where the sound is, what happens when, and clips that sound alike\n"
            f"Model: `{Path(app.config.checkpoint).name}`. Upload a video (at least {limits.min_seconds:g} "
            f"s, with sound; a longer one is cut to its first {limits.max_seconds:g} s; "
            f"files up to {limits.max_bytes / 2**20:.0f} MiB), or pick an example."
        )
        token = gr.State(None)
        with gr.Row():
            upload = gr.File(label="video", file_count="single", elem_id="upload")
            example = gr.Dropdown(
                choices=list(app.examples), value=None, label="or an example clip", elem_id="example"
            )
        status = gr.Markdown("", elem_id="status")
        with gr.Tab("Where is the sound"):
            with gr.Row():
                kind = gr.Radio(kinds, value=kinds[0], label="map", elem_id="map-kind")
                control = gr.Checkbox(
                    False, label="prompt with another clip's sound (control)", elem_id="control"
                )
            caption = gr.Markdown("", elem_id="map-caption")
            with gr.Row():
                video = gr.Video(
                    label="heat maps with the sound", elem_id="overlay-video", format=None, height=360
                )
                strip = gr.Image(
                    label="the 16 frames at their times in the clip", elem_id="strip",
                    type="filepath", height=360,
                )  # fmt: skip
        with gr.Tab("What happens when"):
            segments_text = gr.Markdown("", elem_id="segments-text")
            segments = gr.Image(label="temporal segmentation", elem_id="segments", type="filepath")
            boundaries = gr.Dataframe(
                headers=["time (s)", "boundary score", "event starts"],
                elem_id="boundaries",
                interactive=False,
            )
        with gr.Tab("Clips that sound alike"):
            direction = gr.Radio(list(SEARCH_DIRECTIONS), value=list(SEARCH_DIRECTIONS)[0], label="query")
            gr.Markdown(app.index_problem or "", elem_id="search-note")
            hits = gr.Dataframe(headers=["rank", "clip", "score"], elem_id="hits", interactive=False)
            previews = gr.HTML("", elem_id="previews")

        outputs = [token, status, caption, video, strip, segments_text, segments, boundaries, hits, previews]
        empty = [None, "", "", None, None, "", None, None, None, ""]

        def run(path: str | None, name: str | None, map_kind: str, is_control: bool, query: str):
            try:
                if path:
                    try:
                        new_token, analysis = app.analyse_file(path, Path(path).stem)
                    finally:
                        Path(path).unlink(missing_ok=True)  # uploads are not kept
                elif name:
                    new_token, analysis = app.analyse_file(app.examples[name], name)
                else:
                    return [None, "Upload a video or pick an example.", *empty[2:]]
                film, picture, words = app.overlays(new_token, map_kind, is_control)
                figure, text, rows = app.segmentation_outputs(new_token)
                found, note = app.search(new_token, query)
            except InputProblem as problem:
                return [None, f"**Cannot analyse this file.** {problem}", *empty[2:]]
            except Exception as error:  # a page never shows a stack trace; the log keeps it
                log.exception("analysis failed")
                return [None, f"**Something went wrong:** {type(error).__name__}: {error}", *empty[2:]]
            done = f"Analysed **{html.escape(analysis.name)}**: {analysis.note}."
            return [new_token, done, words, film, picture, text, figure, rows, found, note]

        def remap(current: str | None, map_kind: str, is_control: bool):
            if current is None or current not in app.analyses:
                return "", None, None
            film, picture, words = app.overlays(current, map_kind, is_control)
            return words, film, picture

        def research(current: str | None, query: str):
            if current is None or current not in app.analyses:
                return None, ""
            return app.search(current, query)

        inputs = [upload, example, kind, control, direction]
        upload.upload(run, inputs, outputs, concurrency_limit=1)
        example.input(run, [gr.State(None), example, kind, control, direction], outputs, concurrency_limit=1)
        kind.change(remap, [token, kind, control], [caption, video, strip], concurrency_limit=1)
        control.change(remap, [token, kind, control], [caption, video, strip], concurrency_limit=1)
        direction.change(research, [token, direction], [hits, previews], concurrency_limit=1)
    return page


def run_app(args: App) -> int:
    """`avsync app`: serve the page until stopped."""
    examples = _example_paths(args.examples)
    limits = InputLimits(max_seconds=args.max_seconds, max_bytes=args.max_upload_mib * 2**20)
    config = AppConfig(args.ckpt, args.index, args.videos, tuple(map(str, examples)), limits, args.device)
    app = AvsyncApp(config)
    page = build_page(app)
    allowed = [str(Path(args.videos).resolve())] if args.videos else []
    try:
        page.queue(default_concurrency_limit=1).launch(
            server_name=args.host, server_port=args.port, max_file_size=limits.max_bytes,
            allowed_paths=allowed, ssr_mode=False, show_error=False, quiet=False,
        )  # fmt: skip
    finally:
        app.close()
    return 0


def _example_paths(spec: str | None) -> list[Path]:
    """Example clips from a folder of videos or a list file (one path a line, as `prepare` reads)."""
    if spec is None:
        return []
    path = Path(spec)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)[:12]
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [Path(line) if Path(line).is_absolute() else path.parent / line for line in lines][:12]


__all__ = ["AppConfig", "AvsyncApp", "build_page", "run_app"]
