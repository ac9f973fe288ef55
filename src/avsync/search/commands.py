"""`avsync index build` and `avsync index search` (parser: `avsync.tool_parsers.index`; guide:
docs/search.md). Exit status 0 on success, 2 for an unusable input (the message names the file and
the problem: a missing index, a dimension mismatch, an unknown clip id...)."""

from __future__ import annotations

import json
import sys

from avsync.search.gallery import GalleryError
from avsync.search.index import DIRECTION, TARGET, SearchError
from avsync.tool_parsers import index as build_parser

PROGRAM = "avsync index"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return build_main(args) if args.action == "build" else search_main(args)
    except (SearchError, GalleryError) as error:
        return _fail(error)
    except Exception as error:
        from avsync.cli import _is_input_error

        if not _is_input_error(error):
            raise
        return _fail(error)


def _fail(error: BaseException) -> int:
    print(f"{PROGRAM}: error: {error}", file=sys.stderr)
    return 2


def _say(message: str) -> None:
    print(f"{PROGRAM}: {message}", file=sys.stderr, flush=True)


def build_main(args) -> int:
    from avsync.search.compressed import CompressedSettings
    from avsync.search.index import SearchIndex, build_index

    settings = CompressedSettings(
        pca_dim=args.pca_dim, base_dim=args.base_dim, train_clips=args.train_clips, candidates=args.candidates
    )
    for name in ("pca_dim", "base_dim", "train_clips", "candidates", "chunk_clips"):
        if getattr(args, name) < 1:
            raise SearchError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    out = build_index(
        args.source,
        args.out,
        kind=args.kind,
        modalities=args.modalities,
        settings=settings,
        chunk_clips=args.chunk_clips,
        overwrite=args.overwrite,
        log=None if args.quiet else _say,
    )
    facts = SearchIndex(out).facts
    sizes = ", ".join(f"{m} {size / 2**20:,.1f} MiB" for m, size in facts["bytes"].items())
    _say(
        f"wrote {out}: {facts['kind']} index of {facts['num_clips']:,} clips x {facts['steps']} x "
        f"{facts['dim']} ({sizes}) in {facts['build']['total_s']:.1f} s"
    )
    return 0


def search_main(args) -> int:
    from avsync.search.index import SearchIndex

    index = SearchIndex(args.index)
    modality = args.modality or ("audio" if args.audio is not None else "video")
    if args.audio is not None and modality != "audio":
        raise SearchError(f"{args.audio}: an audio file is an audio query; --modality video needs --video")
    if args.top_k < 1:
        raise SearchError(f"--top-k must be positive, got {args.top_k}")
    index.faiss_index(TARGET[modality])  # a missing gallery is reported before any model is loaded
    if args.clip is not None:
        tokens = index.clip_tokens(args.clip, modality)
        query = {"clip": args.clip}
    else:
        from avsync.search.queries import audio_file_tokens, query_model, video_file_tokens

        model = query_model(index, args.ckpt, args.device)
        if args.audio is not None:
            tokens, query = audio_file_tokens(model, args.audio), {"audio": str(args.audio)}
        else:
            tokens, query = video_file_tokens(model, args.video, modality), {"video": str(args.video)}
    name = next(iter(query.values()))
    tokens = index.check_query(tokens, f"{name} ({modality} query)")
    (hits,) = index.search(tokens, modality, args.top_k, candidates=args.candidates, rerank=args.rerank)
    if args.json:
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
