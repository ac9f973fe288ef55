"""`avsync index build` and `avsync index search` (options: `avsync.tools.IndexBuild`, `IndexSearch`;
guide: docs/search.md). Exit status 0 on success, 2 for an unusable input (the message names the file
and the problem: a missing index, a dimension mismatch, an unknown clip id...)."""

from __future__ import annotations

import functools
import json
import sys

from avsync.search.gallery import GalleryError
from avsync.search.index import DIRECTION, TARGET, SearchError
from avsync.tools import IndexBuild, IndexSearch, matching

PROGRAM = "avsync index"


def _reported(action):
    """`action`, with an unusable input reported in one line (exit status 2) as `avsync index ACTION`."""

    @functools.wraps(action)
    def run(options) -> int:
        try:
            return action(options)
        except (SearchError, GalleryError) as error:
            return _fail(error)
        except Exception as error:
            from avsync.cli import _is_input_error

            if not _is_input_error(error):
                raise
            return _fail(error)

    return run


def _fail(error: BaseException) -> int:
    print(f"{PROGRAM}: error: {error}", file=sys.stderr)
    return 2


def _say(message: str) -> None:
    print(f"{PROGRAM}: {message}", file=sys.stderr, flush=True)


@_reported
def run_build(options: IndexBuild) -> int:
    from avsync.search.compressed import CompressedSettings
    from avsync.search.index import SearchIndex, build_index

    settings = CompressedSettings(**matching(options, CompressedSettings))
    out = build_index(
        **matching(options, build_index, settings=settings, log=None if options.quiet else _say)
    )
    facts = SearchIndex(out).facts
    sizes = ", ".join(f"{m} {size / 2**20:,.1f} MiB" for m, size in facts["bytes"].items())
    _say(
        f"wrote {out}: {facts['kind']} index of {facts['num_clips']:,} clips x {facts['steps']} x "
        f"{facts['dim']} ({sizes}) in {facts['build']['total_s']:.1f} s"
    )
    return 0


@_reported
def run_search(options: IndexSearch) -> int:
    from avsync.search.index import SearchIndex

    index = SearchIndex(options.index)
    modality = options.modality or ("audio" if options.audio is not None else "video")
    if options.audio is not None and modality != "audio":
        raise SearchError(f"{options.audio}: an audio file is an audio query; --modality video needs --video")
    index.faiss_index(TARGET[modality])  # a missing gallery is reported before any model is loaded
    if options.clip is not None:
        tokens = index.clip_tokens(options.clip, modality)
        query = {"clip": options.clip}
    else:
        from avsync.search.queries import audio_file_tokens, query_model, video_file_tokens

        model = query_model(index, options.ckpt, options.device)
        if options.audio is not None:
            tokens, query = audio_file_tokens(model, options.audio), {"audio": str(options.audio)}
        else:
            tokens, query = video_file_tokens(model, options.video, modality), {"video": str(options.video)}
    name = next(iter(query.values()))
    tokens = index.check_query(tokens, f"{name} ({modality} query)")
    (hits,) = index.search(
        tokens, modality, options.top_k, candidates=options.candidates, rerank=options.rerank
    )
    if options.json:
        report = {
            "index": str(index.directory),
            "kind": index.kind,
            "query": {**query, "modality": modality},
            "direction": DIRECTION[modality],
            "exact_scores": hits.exact,
            "results": hits.to_json(),
        }
        print(json.dumps(report, indent=1))
        return 0
    scores = "diagonal mean" + ("" if hits.exact else " (approximate; --rerank N for exact)")
    print(
        f"# {modality} of {name} -> {TARGET[modality]} gallery of {index.directory} ({index.kind}, "
        f"{index.num_clips:,} clips); score: {scores}"
    )
    print(f"{'rank':>4}  {'score':>8}  clip")
    for entry in hits.to_json():
        print(f"{entry['rank']:>4}  {entry['score']:>8.4f}  {entry['clip']}")
    return 0
